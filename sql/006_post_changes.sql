-- Posts can be edited and deleted, and the feed carries every change (docs/delivery.md).
--
-- Each change takes a number from the sequence post ids come from: a new post's version is its
-- id, an edit or a delete gives the post the next number. Readers resume "after change N", and
-- the horizon (feed_app/horizon.py) still holds, since every number comes from that one sequence
-- and every transaction that takes one has its transaction id first. A checkpoint written before
-- this file (a post id) is a change number too: every post's version was its id.
--
-- A delete keeps a tombstone: id, author, created_at, deleted_at and version; the text is
-- blanked in the deleting statement. Resume needs the tombstone to tell a client that showed
-- the post to drop it. Tombstones stay until the author's account is deleted.

ALTER TABLE posts ADD COLUMN version bigint, ADD COLUMN edited_at timestamptz,
    ADD COLUMN deleted_at timestamptz;
UPDATE posts SET version = id;
ALTER TABLE posts ALTER COLUMN version SET NOT NULL;
-- "These authors' changes after N, in order": the resume read. Two indexes, for the two plans
-- PostgreSQL picks between: each author's changes after N, sorted (authors who rarely post), or
-- all changes after N in order, filtered by author (authors who post often: the first few hundred
-- read are the page).
CREATE INDEX posts_author_version_idx ON posts (author_id, version);
CREATE INDEX posts_version_idx ON posts (version);
-- Feed pages and a socket's history read the live posts of each author backwards by id; with
-- the tombstones left out of the index they stay index-only scans that never meet one.
CREATE INDEX posts_live_author_id_idx ON posts (author_id, id) WHERE deleted_at IS NULL;
DROP INDEX posts_author_id_idx;

-- One outbox row per change, so an edit of a post whose first publish is still pending (or
-- done) goes out again. The relay publishes the post's state when it claims the row: a row
-- overtaken by a later change sends that later state, which clients take in its place.
ALTER TABLE outbox ADD COLUMN version bigint;
UPDATE outbox SET version = post_id;
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey, ALTER COLUMN version SET NOT NULL,
    ADD PRIMARY KEY (version);
CREATE INDEX outbox_post_id_idx ON outbox (post_id);

CREATE OR REPLACE FUNCTION create_post(author bigint, body text, lease double precision)
RETURNS posts LANGUAGE plpgsql AS $$
DECLARE
    post posts;
    number bigint;
BEGIN
    -- Take the transaction id first: a reader's horizon counts on every transaction that holds a
    -- number of post_ids having had its transaction id before the number was handed out.
    PERFORM pg_current_xact_id();
    number := nextval('post_ids');
    INSERT INTO posts (id, author_id, text, version) VALUES (number, author, body, number)
        RETURNING * INTO post;
    INSERT INTO outbox (version, post_id, claimed_until)
        VALUES (post.version, post.id, now() + lease * interval '1 second');
    RETURN post;
END
$$;

-- An edit (body) or a delete (body NULL) of the author's own live post, with its outbox row,
-- in the caller's transaction. Returns the post as it is now and why nothing changed, if so:
-- 'missing' (no such post, or deleted: deleting again is 'deleted', so a delete is idempotent),
-- 'forbidden' (another author's). The row lock orders concurrent changes of one post: the
-- version is drawn after the lock is held, so a later change always has the higher version.
CREATE FUNCTION change_post(post_id bigint, author bigint, body text, lease double precision)
RETURNS TABLE (post posts, refusal text) LANGUAGE plpgsql AS $$
DECLARE
    found posts;
BEGIN
    PERFORM pg_current_xact_id();
    SELECT * INTO found FROM posts p WHERE p.id = change_post.post_id FOR UPDATE;
    IF found.id IS NULL THEN
        RETURN QUERY SELECT NULL::posts, 'missing';
    ELSIF found.author_id <> author THEN
        RETURN QUERY SELECT NULL::posts, 'forbidden';
    ELSIF found.deleted_at IS NOT NULL THEN
        RETURN QUERY SELECT found, CASE WHEN body IS NULL THEN 'deleted' ELSE 'missing' END;
    ELSE
        UPDATE posts p SET
            version = nextval('post_ids'),
            text = coalesce(body, ''),
            edited_at = CASE WHEN body IS NULL THEN p.edited_at ELSE now() END,
            deleted_at = CASE WHEN body IS NULL THEN now() END
        WHERE p.id = found.id RETURNING * INTO found;
        INSERT INTO outbox (version, post_id, claimed_until)
            VALUES (found.version, found.id, now() + lease * interval '1 second');
        RETURN QUERY SELECT found, NULL::text;
    END IF;
END
$$;
