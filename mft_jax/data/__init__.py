"""SFT data: sources -> chat-formatted token ids and labels -> TFDS cache (array_record) -> grain batches.

Modules, in data-flow order:
- `sources`: read local .jsonl / .json / .parquet files or hub datasets (org/name[:config]:split); the seeded
  `{source: rows}` mixer.
- `schemas`: rows of any supported layout (messages, ShareGPT, alpaca, prompt/completion, ...) -> messages.
- `formatting`: tulu / chat_template / plain rendering and the reference's labels (encode_sft_example),
  tokenizer loading and a small offline BPE trainer.
- `accounting`: per-source counts (read, taken, kept, dropped by reason, truncated) and the drop check.
- `store`: the TFDS builder and cache (`build_dataset` -> `DatasetInfo`).
- `loader`: packing plan, batch assembly, the grain loader (`make_loader`) and `to_global_batch`.
- `commands`: `mft-jax data build | inspect` (`add_data_commands`).
"""

from mft_jax.data.accounting import SourceStats, check_drops, source_table
from mft_jax.data.commands import add_data_commands
from mft_jax.data.formatting import (TULU_CHAT_TEMPLATE, format_tulu, load_tokenizer, make_renderer, render,
                                     tokenize_example, train_bpe_tokenizer)
from mft_jax.data.loader import (BATCH_DTYPES, BATCH_KEYS, SFTLoader, assemble_batch, make_loader, pack_rows,
                                 plan_rows, to_global_batch)
from mft_jax.data.schemas import DROP_REASONS, DroppedExample, detect_schema, row_to_messages
from mft_jax.data.sources import DataError, mix, parse_hub_name, read_rows
from mft_jax.data.store import DatasetInfo, build_dataset, cache_key, open_data_source

__all__ = [
    "BATCH_DTYPES", "BATCH_KEYS", "DROP_REASONS", "DataError", "DatasetInfo", "DroppedExample", "SFTLoader",
    "SourceStats",
    "TULU_CHAT_TEMPLATE", "add_data_commands", "assemble_batch", "build_dataset", "cache_key", "check_drops",
    "detect_schema", "format_tulu", "load_tokenizer", "make_loader", "make_renderer", "mix", "open_data_source",
    "pack_rows", "parse_hub_name", "plan_rows", "read_rows", "render", "row_to_messages", "source_table",
    "to_global_batch", "tokenize_example", "train_bpe_tokenizer",
]
