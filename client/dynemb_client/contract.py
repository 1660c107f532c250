"""The wire contract of the `user_interest` and `recommend` ensembles.

The server's typed stage specs (dynemb.specs) import these names, so client and server
cannot drift apart. Shapes (L events, M labels) are read from the server's model metadata
at connect time; the defaults below are what a stock build serves.

One request is one user:
  EVENT_TEXT   BYTES [L]     UTF-8 text of each event ("" for padding)
  EVENT_IMAGE  BYTES [L]     encoded image bytes (PNG/JPEG/...), b"" = no image
  EVENT_LABELS BYTES [L, M]  label strings such as "genre:Comedy", b"" = no label
  EVENT_TIME   FP64  [L]     unix seconds, non-decreasing over the real events
  EVENT_COUNT  INT32 [1]     number of real events; events [0, count) are real
  QUERY_TIME   FP64  [1]     the query time t (events after t are ignored)
  TOP_K        INT32 [1]     recommend only: how many items to return (1-100; the same
                             for every user of one request)
"""

from __future__ import annotations

USER_INTEREST = "user_interest"
RECOMMEND = "recommend"

EVENT_TEXT = "EVENT_TEXT"
EVENT_IMAGE = "EVENT_IMAGE"
EVENT_LABELS = "EVENT_LABELS"
EVENT_TIME = "EVENT_TIME"
EVENT_COUNT = "EVENT_COUNT"
QUERY_TIME = "QUERY_TIME"
TOP_K = "TOP_K"

USER_EMBEDDING = "USER_EMBEDDING"
ITEM_IDS = "ITEM_IDS"
ITEM_SCORES = "ITEM_SCORES"
ITEM_TITLES = "ITEM_TITLES"

# Every answer also says which version of each stage computed it (during a rolling swap
# two versions serve at once): the ensembles (and `session`) output, per stage they ran,
#   <STAGE>_VERSION INT64 [1]   e.g. TEXT_RNN_VERSION (a client asks for them or not)
INTEREST_STAGES = (
    "preprocess",
    "text_rnn",
    "image_cnn",
    "label_mlp",
    "temporal_lstm",
    "llm_encoder",
)
RECOMMEND_STAGES = (*INTEREST_STAGES, "retrieve")


def version_output(stage: str) -> str:
    """The output that reports the version of `stage` that computed a response."""
    return f"{stage.upper()}_VERSION"


DEFAULT_MAX_EVENTS = 50
DEFAULT_MAX_LABELS = 8
MAX_TOP_K = 100
# Latest accepted time: 2100-01-01T00:00:00Z. Larger values are overflow, not dates.
MAX_TIME_S = 4_102_444_800.0

# The `session` model: E_t advanced by a user's new events (server-side state per user).
#   SESSION_ID    BYTES [1]  the user (or session) id, 1-256 bytes
#   SESSION_OP    INT32 [1]  OP_UPDATE: append the events to the session's state;
#                            OP_START: the events are the whole history (replaces any state);
#                            OP_FORGET: drop the session's state (the events are ignored)
#   + EVENT_TEXT, EVENT_IMAGE, EVENT_LABELS, EVENT_TIME, EVENT_COUNT, QUERY_TIME as above
#     (the new events only; none may precede the session's newest event or follow t)
# ->USER_EMBEDDING FP32 [D]; SESSION_STATUS INT32 [1]; SESSION_EVENTS INT32 [1] (events held);
#   SESSION_READ INT64 [1] (events the session has read since its start: a client that
#   expected fewer knows another writer added events it does not keep; not in a session
#   model built before it);
#   <STAGE>_VERSION INT64 [1] for each of INTEREST_STAGES: the versions it serves with
SESSION = "session"
RETRIEVE = RECOMMEND_STAGES[-1]  # called directly by a session's recommend
SESSION_ID = "SESSION_ID"
SESSION_OP = "SESSION_OP"
SESSION_STATUS = "SESSION_STATUS"
SESSION_EVENTS = "SESSION_EVENTS"
SESSION_READ = "SESSION_READ"
OP_UPDATE, OP_START, OP_FORGET = 0, 1, 2
# STATUS_UNKNOWN: the server holds no state for the session (never seen, evicted, expired,
# restarted, or computed by a stage version no longer served): send OP_START with the
# history. USER_EMBEDDING is then zeros and must not be used.
STATUS_OK, STATUS_UNKNOWN, STATUS_FORGOTTEN = 0, 1, 2
MAX_SESSION_ID_BYTES = 256
MAX_SESSION_ROWS = 32  # sessions one `session` request may carry (its max batch size)
