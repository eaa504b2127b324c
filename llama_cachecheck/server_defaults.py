"""llama-server's own numbers, once: its defaults and the thresholds of its slot and prompt-cache rules, as
the pinned build has them (llama.cpp 0c1e57098, the tree llama-cpp-python 0.3.36 vendors). Every model of
a server in cachecheck (the in-process slots and policy, the promise, the invariants, the reference's
flags) reads them here; a build that differs says so in its `--help` (engines/capabilities.py reads it).
"""

CTX_CHECKPOINTS = 32  # --ctx-checkpoints: common/common.h 631 (n_ctx_checkpoints)
CHECKPOINT_MIN_STEP = 8192  # --checkpoint-min-step: common/common.h 633
CACHE_RAM_MIB = 8192  # --cache-ram, MiB of host memory for the prompt cache (0 off, -1 no limit): common.h 634
SLOT_PROMPT_SIMILARITY = 0.1  # --slot-prompt-similarity: common/common.h 697
N_PARALLEL_AUTO = 4  # -np auto: tools/server/server.cpp 157-159 ("using n_parallel = 4 and kv_unified = true")
SAVE_BELOW_KEEP = 0.5  # a slot chosen by similarity saves its prompt first when it keeps less than this
#                        share of it (f_keep < 0.5f): tools/server/server-context.cpp 1587
HOST_LOAD_MIN_KEEP = 0.25  # the host cache loads no entry that keeps less than a quarter of itself
#                            (f_keep_cur < 0.25f, "don't trash large prompts"): tools/server/server-task.cpp 1813
