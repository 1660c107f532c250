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
  TOP_K        INT32 [1]     recommend only: how many items to return
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

DEFAULT_MAX_EVENTS = 50
DEFAULT_MAX_LABELS = 8
MAX_TOP_K = 100
# Latest accepted time: 2100-01-01T00:00:00Z. Larger values are overflow, not dates.
MAX_TIME_S = 4_102_444_800.0
