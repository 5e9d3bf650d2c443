"""Reference model (plain and ``PipelineModule`` forms), byte tokenizer, corpus and sharded sampler."""
from ds_ext.data.corpus import (ByteTokenizer, TokenWindows, corpus_files, load_corpus, sharded_batches,
                                threads_per_process, train_eval_split)
from ds_ext.models.llama import IGNORE_INDEX, LlamaForCausalLM, ModelConfig, causal_lm_loss, sdpa_attention
from ds_ext.models.pipeline import llama_pipeline, plain_to_pipeline_key

__all__ = ["ByteTokenizer", "TokenWindows", "corpus_files", "load_corpus", "sharded_batches", "threads_per_process",
           "train_eval_split", "IGNORE_INDEX", "LlamaForCausalLM", "ModelConfig", "causal_lm_loss", "sdpa_attention",
           "llama_pipeline", "plain_to_pipeline_key"]
