-- A plugin that does nothing in every phase: bench/run.sh chains five of
-- them to measure what the plugin runner itself costs per request.
local P = { name = "noop-d", priority = 100, schema = { fields = {} } }

function P.rewrite(conf, ctx) end
function P.access(conf, ctx) end
function P.header_filter(conf, ctx) end
function P.log(conf, ctx) end

return P
