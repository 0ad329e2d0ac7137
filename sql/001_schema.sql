-- Users, who follows whom, posts, and the outbox that makes publishing survive faults.

CREATE TABLE users (
    id            bigserial PRIMARY KEY,
    name          text        NOT NULL,
    password_hash text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE follows (
    follower_id bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id   bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (follower_id, author_id),
    CHECK (follower_id <> author_id)
);
CREATE INDEX follows_author_idx ON follows (author_id);

-- Post ids are handed out by post_clock, not by a sequence: the single counter row is locked from
-- the id's allocation until the inserting transaction commits, so post ids are in commit order.
-- A reader that has seen post N therefore knows every post with a smaller id is already visible,
-- which is what makes "resume after post N" exact (see db.insert_post).
CREATE TABLE post_clock (
    last_id bigint NOT NULL,
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton)
);
INSERT INTO post_clock (last_id) VALUES (0);

CREATE TABLE posts (
    id         bigint      PRIMARY KEY,
    author_id  bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    text       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX posts_author_id_idx ON posts (author_id, id);

-- A post waits here until the broker has confirmed its publication. claimed_until is a lease:
-- the writing process publishes at once; if it dies, another one takes the row over when the
-- lease runs out.
CREATE TABLE outbox (
    post_id       bigint      PRIMARY KEY REFERENCES posts (id) ON DELETE CASCADE,
    claimed_until timestamptz NOT NULL
);
CREATE INDEX outbox_claimed_until_idx ON outbox (claimed_until);
