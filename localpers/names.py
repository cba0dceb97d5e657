"""Names shared across localpers, defined once: artifact kinds, personalization method names, job kinds.

Every personalization technique ends as one of llama.cpp's three primitives. Two of them are files that the
store's artifact registry holds per (user, method, kind, served model): a LoRA adapter or a control vector
(and, for `personalize --bake`, a whole model). The third, prompt context, is computed per request and never
stored as a file.
"""
from __future__ import annotations

# ---- artifact kinds (store.register_artifact(kind=...), the registry's `kind` column)
LORA = "lora"                      # llama.cpp LoRA adapter GGUF (general.type = adapter, adapter.type = lora)
CONTROL_VECTOR = "control_vector"  # llama.cpp control-vector GGUF (direction.{layer} tensors)
MODEL = "model"                    # a whole GGUF with edits baked in (personalize --bake)
LORA_ROUTES = "lora_routes"        # a folder of LoRA adapters, one per stated fact (routed edits): a request gets
                                   # the one its question is routed to (registry meta["routes"]: file, words)
ARTIFACT_KINDS = (LORA, CONTROL_VECTOR, MODEL, LORA_ROUTES)

# ---- history item kinds (store items' `kind`; `remember --kind`, `history --kind`)
MESSAGE = "message"        # something the user said (the default)
PREFERENCE = "preference"  # a stated preference: `personalize` edits these, the `prompt` method lists them
SUPERSEDED_BY = "superseded_by"  # a message's meta key: the id of the later message that replaced or withdrew a
                                 # fact it stated ("I live in Oslo." after "I moved to Paris."); not retrieved
# meta keys the store derives for facts and the messages they come from (store._learn, facts(), _mark_superseded):
# never taken from a client's meta (POST /v1/users/{user}/memories refuses them: a fact's slot is learned, not set)
SUPERSEDES = "supersedes"  # a message's meta key: {id of an earlier message: [the slots (keyed hashes, hex) of its
                           # facts this message replaced or retired]}: what a withdrawal of this message learns again
FACT_META_KEYS = ("attribute", "attribute_type", "value", "message", "source", SUPERSEDED_BY, SUPERSEDES)
DOCUMENT = "document"      # a text the user wrote (LaMP/LongLaMP profile entries)
REVIEW = "review"          # a review the user wrote (LaMP/LongLaMP product reviews)
ITEM_KINDS = (MESSAGE, PREFERENCE, DOCUMENT, REVIEW)

# ---- learning from chat (localpers.serve.learn, store.learn_chat)
MAX_FACTS_PER_MESSAGE = 16  # facts one message may add, replace or retire; the rest of the message is not learned
                            # (a message of 4,095 statements costs what 16 do: the write path stays short)

# ---- job states (store.jobs; GET /v1/users/{user}/jobs)
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"

# ---- personalization methods (names in `--method`/`--personalize` specs; "a+b" composes)
BASE = "base"      # the model as it is
PROMPT = "prompt"  # stated preferences in the system message
RAG = "rag"        # top-k retrieved history items before the question
FACTS = "facts"    # the stated preferences that bear on the question, in a compact line before it
MEMORY = "memory"  # the served memory: the edit, and for a request also `facts` (methods.memory)
EDIT = "edit"      # Personalization Editing: rank-one ROME edits of ffn_down -> LoRA adapter
MEMORY_PARTS = (EDIT, FACTS)  # what `memory` is made of: a composition with it has a trained part (edit)
CE = "ce"          # plain cross-entropy LoRA fine-tuning on the user's history (PerCE's baseline)
PERCE = "perce"    # PerContrast-weighted LoRA fine-tuning (arXiv 2603.06595) -> LoRA adapter
LOGO = "logo"      # LoGo: community knowledge fused with local signals by a mediator -> control vectors, context
# LoGo's ablations (evaluation only): no temporal decay, no mediator (fixed weights), random communities
LOGO_ABLATIONS = ("logo-nodecay", "logo-nomediator", "logo-random")
# PerCE's ablations (evaluation only; training.PERCE_ABLATIONS): clip range 0.5..5, no clipping (w = PIR as is),
# weights frozen at step 0 (no bootstrap), the loss divided by sum w instead of n
PERCE_ABLATIONS = ("perce-clip05", "perce-noclip", "perce-frozen", "perce-wnorm")

# Personalization Editing's ablation (evaluation only): the single-turn edit (no chat context templates)
EDIT_ABLATIONS = ("edit-1turn", "edit-stacked", "edit-allq", "edit-joint")

# A user with this many edited facts or more gets routed edits (names.LORA_ROUTES): one single-fact adapter per
# fact, the request's question picks at most one. One fact: its adapter, always applied. Joint adapters of several
# facts were not local: KL 0.30 / 0.96 / 3.2 / 6.7 nats/token at 2 / 3 / 5 / 10 facts on the evaluation's neutral
# prompts, routed 0.002 (BENCHMARKS.md §4; why: bench/experiments/joint_key_firing.py).
EDIT_ROUTE_FROM = 2

# Methods whose artifacts are trained ahead of time and served from the registry (never trained on a request).
TRAINED_METHODS = (EDIT, CE, PERCE, LOGO)

# ---- serving limits
# Loaded LoRA adapters an engine keeps (an LRU, by adapter file bytes; `localpers serve --adapter-cache-mb`).
# Adapters held by requests in flight are never freed, so the bound can be exceeded by what those hold.
ADAPTER_CACHE_BYTES = 64 << 20
# ---- limits of `localpers serve` (localpers.serve.limits; README "Limits")
MAX_REQUEST_TOKENS = 4096  # n x max_tokens of one generating request (max_tokens counted up to the context); --max-request-tokens
HEADER_TIMEOUT_S = 10.0    # a client must send a request's headers within this (also between keep-alive requests)
BODY_TIMEOUT_S = 30.0      # ... and then its body within this; a slower client is disconnected
FD_RESERVE = 128           # descriptors kept from the connection cap for the job worker, the model and the database
MAX_KEPT_RESPONSES = 1000  # /v1/responses conversations kept per user for previous_response_id (the newest)
