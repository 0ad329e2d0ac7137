-- Every running service process and its heartbeats: how a process knows which peers it should be
-- hearing on the broker, and since when, without trusting the broker to say
-- (feed_app/path_check.py). `sent` is the last beat a process had published when it wrote the row
-- (at seen_at, PostgreSQL's clock: the one clock every process shares), `confirmed` the last the
-- broker had confirmed. Rewritten twice a second by each process and worth nothing after a crash,
-- so unlogged: no WAL for it, and emptied by a crash of the server.
CREATE UNLOGGED TABLE live_processes (
    id        text        PRIMARY KEY,
    sent      bigint      NOT NULL,
    confirmed bigint      NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
