-- Follow changes wait here until the broker has confirmed their announcement, as posts wait in
-- the outbox: a follow made through an instance that cannot reach RabbitMQ at that moment still
-- reaches the user's open sessions on every instance. claimed_until is the same kind of lease.
CREATE TABLE follow_outbox (
    id            bigserial   PRIMARY KEY,
    follower_id   bigint      NOT NULL,
    author_id     bigint      NOT NULL,
    claimed_until timestamptz NOT NULL
);
CREATE INDEX follow_outbox_claimed_until_idx ON follow_outbox (claimed_until);
