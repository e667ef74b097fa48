-- wrk's summary as one JSON line, for bench/network.py to read.
done = function(summary, latency, requests)
   local errors = summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.status + summary.errors.timeout
   local seconds = summary.duration / 1e6
   io.write(string.format('{"requests": %.1f, "bytes": %.1f, "errors": %d}\n',
      summary.requests / seconds, summary.bytes / seconds, errors))
end
