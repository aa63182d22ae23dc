"""Redis plumbing, the bottom layer of the library: nothing here imports the bus, the portfolio or
the safety rules.

- :mod:`.connection`: a client for one URL, once the server answers; the reconnect contract.
- :mod:`.server`: the embedded ``redis-server`` (start, stop, its generated password).
- :mod:`.client`: the URL a service uses (``REDIS_URL`` or the embedded server's), scripts
  registered once, replies as text, the hash scripts several modules share.
- :mod:`.boundary`: where redis-py's errors become Bastion's, and the one back-off for waiting
  an outage out.
"""
