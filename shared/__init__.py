"""The library every Bastion service uses, in layers (a module imports only from its layer or below):

1. the runtime: :mod:`.clock`, :mod:`.config`, :mod:`.errors`, :mod:`.keys`, :mod:`.logging`,
   :mod:`.models`, :mod:`.stop`;
2. :mod:`.redis`: connecting, the embedded server, scripts, the error boundary;
3. :mod:`.bus` (streams, codec, idempotency) and :mod:`.portfolio` (the fenced account);
4. :mod:`.safety` (limits, protections, deferred intents, symbols, trading state, account
   activity, rate limits) and :mod:`.brokers`;
5. :mod:`.service` and :mod:`.heartbeat`: the shape every service process shares.
"""
