"""Ray jobs: `jobs.convert` (dense base -> LiSA backbone) and `jobs.adapt` (task adapters).

A job prints, as its last line, RESULT_MARKER followed by one JSON object; the SDK reads
its result from there (`sdk.client.parse_result`).
"""

RESULT_MARKER = "LISA_HUB_RESULT "
