"""Ray jobs: `jobs.convert` (dense base -> LiSA backbone) and `jobs.adapt` (task adapters),
both run through `jobs.runtime` (connection, run storage, Train fit, the result line).

A job prints, as its last line, `runtime.RESULT_MARKER` followed by one JSON object; the
SDK reads its result with `runtime.parse_result`.
"""
