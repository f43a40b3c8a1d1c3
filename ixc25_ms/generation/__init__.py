"""Generation on the KV cache: one config object, composable logits warpers, greedy/sampling and beam search."""
from .config import GenerationConfig
from .generate import (CAPACITY_BUCKET, PROMPT_BUCKET, bucket_length, capacity, generate, iter_generate, left_pad,
                       prepare_prompt)
from .sampling import log_softmax, make_warper, repetition_penalty, softmax, top_k_filter, top_p_filter
