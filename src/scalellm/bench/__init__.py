"""`scalellm bench`: end-to-end latency and throughput of any OpenAI-compatible endpoint.

Parts, one job each:
  http_client   lean asyncio HTTP/1.1 client (keep-alive pool, chunked decoding, callbacks)
  sse           incremental Server-Sent Events parser
  openai_sink   one OpenAI response -> one RequestRecord, as the bytes arrive
  endpoint      an endpoint's address, model, request bodies, /tokenize, preflight
  tokens        token counting: server /tokenize or a local tokenizer
  workload      the requests to send (synthetic exact lengths, shared prefixes, files)
  runner        closed- and open-loop load, sweeps, A/B rounds
  stats         latency definitions, percentiles, summaries, goodput
  timings       server-reported timings (Server-Timing, usage.timings) -> breakdown
  report        progress bar and tables; results: the JSON document; plots: PNG charts
  cli           the command's flags and glue

Knows nothing of the engine, torch, the server or the gateway: it talks HTTP only.
"""
