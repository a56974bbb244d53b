"""SFT data: sources -> chat-formatted token ids and labels -> TFDS cache (array_record) -> grain batches.

Modules, in data-flow order:
- `sources`: read local .jsonl / .json / .parquet files or hub datasets; the seeded `{source: rows}` mixer.
- `formatting`: tulu / chat_template / plain formatting, exact supervised-token labels, tokenizer loading and
  a small offline BPE trainer.
- `store`: the TFDS builder and cache (`build_dataset` -> `DatasetInfo`).
- `loader`: packing plan, batch assembly, the grain loader (`make_loader`) and `to_global_batch`.
- `commands`: `mft-jax data build | inspect` (`add_data_commands`).
"""

from mft_jax.data.commands import add_data_commands
from mft_jax.data.formatting import (DROP_REASONS, TULU_CHAT_TEMPLATE, DroppedExample, format_tulu, load_tokenizer,
                                     render, row_to_messages, tokenize_example, train_bpe_tokenizer)
from mft_jax.data.loader import (BATCH_KEYS, SFTLoader, assemble_batch, make_loader, pack_rows, plan_rows,
                                 to_global_batch)
from mft_jax.data.sources import DataError, mix, read_rows
from mft_jax.data.store import DatasetInfo, build_dataset, cache_key, open_data_source

__all__ = [
    "BATCH_KEYS", "DROP_REASONS", "DataError", "DatasetInfo", "DroppedExample", "SFTLoader", "TULU_CHAT_TEMPLATE",
    "add_data_commands", "assemble_batch", "build_dataset", "cache_key", "format_tulu", "load_tokenizer",
    "make_loader", "mix", "open_data_source", "pack_rows", "plan_rows", "read_rows", "render", "row_to_messages",
    "to_global_batch", "tokenize_example", "train_bpe_tokenizer",
]
