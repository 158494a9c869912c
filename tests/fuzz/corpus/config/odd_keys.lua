return { routes = { [1.5] = {}, [-1] = {} }, listen = {} }
