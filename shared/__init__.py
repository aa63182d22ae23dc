"""The library every Bastion service uses: bus, codec, config, clock, locks, portfolio, brokers, logging."""
