-- Post ids from a sequence instead of the post_clock row, which every post of every instance
-- locked until its commit (and its fsync) was done: one lock for the whole deployment.
--
-- Ids are no longer in commit order: a post can commit after one with a higher id. A reader
-- therefore cannot take "the last id handed out" as the point up to which it has seen every post.
-- It takes a horizon instead (db.HorizonClock): an id below which every transaction that took an
-- id had finished when the read's snapshot was taken. That needs each post's transaction to have
-- its transaction id before it takes a post id, which create_post() makes sure of.

CREATE SEQUENCE post_ids AS bigint OWNED BY posts.id;  -- CACHE 1: last_value is exact
SELECT setval('post_ids', greatest(last_id, 1), last_id > 0) FROM post_clock;
DROP TABLE post_clock;

-- A post and its outbox row, in the caller's transaction.
CREATE FUNCTION create_post(author bigint, body text, lease double precision)
RETURNS posts LANGUAGE plpgsql AS $$
DECLARE
    post posts;
BEGIN
    -- Take the transaction id first: a reader's horizon counts on every transaction that holds a
    -- post id having had its transaction id before the id was handed out.
    PERFORM pg_current_xact_id();
    INSERT INTO posts (id, author_id, text) VALUES (nextval('post_ids'), author, body)
        RETURNING * INTO post;
    INSERT INTO outbox (post_id, claimed_until)
        VALUES (post.id, now() + lease * interval '1 second');
    RETURN post;
END
$$;
