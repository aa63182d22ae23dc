"""The embedded Redis process: ``make run``'s Redis when ``REDIS_URL`` is unset.

Consumes and produces nothing on the streams. It starts :class:`shared.redis.server.RedisServer`
and keeps it up; with ``REDIS_URL`` set it starts nothing and waits to be stopped, so honcho
keeps the other processes running.

Stopping: honcho signals every process at once (each process group). The server runs in its own
process group, so that signal reaches only this process, which keeps the server up while other
clients are still connected (services finishing the message in hand, the rq worker releasing its
locks), at most ``embedded_redis.stop_wait_s``, then stops it (SIGTERM: the AOF is flushed). On
Linux the server also gets SIGTERM if this process dies without stopping it.
"""
