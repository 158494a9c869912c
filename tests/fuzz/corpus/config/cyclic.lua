local t = {} t.routes = t return t
