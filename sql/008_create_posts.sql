-- Group commit (feed_app/group_commit.py): the posts a process is asked for while its previous
-- batch is at PostgreSQL are stored by one statement in one transaction, so they share one
-- round trip, one commit and one WAL flush. Each post is what create_post() makes of it: its
-- number drawn after the transaction id (the horizon), in the order given, and an outbox row.
--
-- A post whose author does not exist (a validly signed token of a user not in this database) is
-- left out instead of failing the whole batch; the caller refuses that request alone. The
-- authors' rows are locked FOR KEY SHARE (the lock the foreign key check takes anyway) before
-- the filter, so an author deleted meanwhile cannot fail the batch between the two.
-- Returns the 1-based position in the arrays of each post stored, with the post. ROWS: a batch
-- is a handful of posts, so the caller's join with users is planned as lookups by id, never as
-- a scan of the whole table (the default guess is 1000 rows).
CREATE FUNCTION create_posts(authors bigint[], bodies text[], lease double precision)
RETURNS TABLE (slot bigint, post posts) LANGUAGE plpgsql ROWS 10 AS $$
DECLARE
    known bigint[];
BEGIN
    PERFORM pg_current_xact_id();
    known := ARRAY(SELECT u.id FROM users u WHERE u.id = ANY(authors) FOR KEY SHARE);
    RETURN QUERY
    WITH numbered AS MATERIALIZED (
        SELECT n.place, n.author, n.body, nextval('post_ids') AS number
        FROM unnest(authors, bodies) WITH ORDINALITY AS n(author, body, place)
        WHERE n.author = ANY(known)
    ), stored AS (
        INSERT INTO posts AS p (id, author_id, text, version)
        SELECT numbered.number, numbered.author, numbered.body, numbered.number FROM numbered
        RETURNING p.*
    ), queued AS (
        INSERT INTO outbox (version, post_id, claimed_until)
        SELECT numbered.number, numbered.number, now() + lease * interval '1 second'
        FROM numbered
    )
    SELECT numbered.place, stored::posts
    FROM numbered JOIN stored ON stored.id = numbered.number;
END
$$;
