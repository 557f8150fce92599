"""Train small Llama-architecture language models and watch attention sinks emerge.

`train(TrainConfig(...))` trains a `transformers.LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, tied embeddings) on a
text corpus, on the synthetic Bigram-Backcopy task, or on a mix of both, with a byte-level BPE tokenizer trained by
the `tokenizers` library whose `PreTrainedTokenizerFast` prepends BOS (`<s>`) to every sequence. Every training
sequence is `<s>` followed by seq_len − 1 tokens. A run folder holds:

    OUT/tokenizer/        the tokenizer (trained once, reused on resume)
    OUT/units/checkpoint-<step>/  the latest `save_pretrained` checkpoint (safetensors) + train_state.pt
                          (optimizer, step), a `sinkscope.store` unit: verified by size and sha256 before a resume
    OUT/model/            the final model (save_pretrained + tokenizer), written when the run completes
    OUT/trace.parquet     the emergence trace (`TRACE_COLUMNS`), one row per (step, layer, head)
    OUT/manifest.json     sinkscope run manifest (`sinkscope.store.load_run(OUT)["trace"]` reads the trace)
    OUT/run.json, OUT/train_config.json   the settings the folder is bound to, and the full TrainConfig

Training is deterministic per seed: the model is initialised from `seed`, and the batch of step s is drawn from a
generator seeded with (seed, s), so a run killed and resumed from its last checkpoint (`resume=True`) ends with the
same weights and trace as an uninterrupted one (on CPU; GPU kernels may differ in the last bits).

Modules: `variants` (the attention variants: softmax, off_by_one, sink_logit, gated), `data` (corpus, tokenizer,
synthetic task, batches), `model` (TrainConfig, building and loading models, the shipped sinkscope-tiny),
`statistics` (attention_stats and the emergence trace), `train` (the training loop). Load variant checkpoints with
`load_checkpoint` (which restores the parameters, hooks and attention function); plain
`LlamaForCausalLM.from_pretrained` loads only softmax checkpoints faithfully.
"""

from sinkscope.toy.tinylm.variants import (  # noqa: I001  (train last: its function shadows the module name)
    ATTN_NAMES,
    VARIANTS,
    apply_variant,
    check_variant,
    softmax_off_by_one,
    softmax_with_sink,
    variant_of,
    variant_probs,
)
from sinkscope.toy.tinylm.data import (
    BOS,
    EOS,
    PAD,
    SYNTHETIC,
    TEXT_SUFFIXES,
    UNK,
    BigramBackcopy,
    Data,
    TriggerRecall,
    check_synthetic,
    corpus_files,
    encode_stream,
    eval_batch,
    load_corpus,
    make_batch,
    prepare_data,
    read_documents,
    split_documents,
    train_tokenizer,
    word_tokenizer,
)
from sinkscope.toy.tinylm.model import (
    TINY_DIR_NAME,
    TrainConfig,
    build_model,
    llama_config,
    load_checkpoint,
    load_tiny,
    tiny_dir,
    tiny_sinks,
)
from sinkscope.toy.tinylm.statistics import (
    EPSILONS,
    TRACE_COLUMNS,
    AttentionStats,
    attention_stats,
    read_trace,
    summarise,
    trace_rows,
)
from sinkscope.toy.tinylm.train import TrainResult, lr_at, make_optimizer, resolve_device, saved_config, train

__all__ = [
    "ATTN_NAMES", "BOS", "EOS", "EPSILONS", "PAD", "SYNTHETIC", "TEXT_SUFFIXES", "TINY_DIR_NAME", "TRACE_COLUMNS",
    "UNK", "VARIANTS", "AttentionStats", "BigramBackcopy", "Data", "TrainConfig", "TrainResult", "TriggerRecall",
    "apply_variant",
    "attention_stats", "build_model", "check_synthetic", "check_variant", "corpus_files",
    "encode_stream", "eval_batch", "llama_config", "load_checkpoint", "load_corpus", "load_tiny", "lr_at",
    "make_batch", "make_optimizer", "prepare_data", "read_documents", "read_trace", "resolve_device", "saved_config",
    "softmax_off_by_one", "softmax_with_sink", "split_documents", "summarise", "tiny_dir", "tiny_sinks",
    "trace_rows", "train", "train_tokenizer", "variant_of", "variant_probs", "word_tokenizer",
]
