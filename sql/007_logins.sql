-- Log-ins that the server can end (docs/api.md, "Tokens"). A log-in is one device's session: its
-- access tokens carry its id (`sid`) and live minutes; its refresh tokens, stored here only as
-- SHA-256 hashes, are exchanged one for the next at every refresh. Ending a log-in (log-out, log-out
-- everywhere, a password change, a refresh token used twice) sets revoked_at; every process reads
-- the recently ended ones twice a second (feed_app/revocations.py) and refuses their tokens.
CREATE TABLE logins (
    id         bigserial   PRIMARY KEY,
    user_id    bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX logins_live_by_user_idx ON logins (user_id) WHERE revoked_at IS NULL;
CREATE INDEX logins_revoked_at_idx ON logins (revoked_at) WHERE revoked_at IS NOT NULL;

-- rotated_at is set when the token was exchanged for the next one. The row stays until it
-- expires: a second use of it is the sign of a stolen token, and ends the log-in.
CREATE TABLE refresh_tokens (
    hash       bytea       PRIMARY KEY,
    login_id   bigint      NOT NULL REFERENCES logins (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz
);
CREATE INDEX refresh_tokens_login_idx ON refresh_tokens (login_id);

-- Exchange a refresh token for the next one, atomically (the token's row is locked, so of two
-- concurrent uses one rotates and the other sees it rotated). The outcome:
--   rotated  the new hash is stored; the caller sets the new token's cookie
--   grace    already rotated less than `grace` seconds ago: two tabs of one browser refreshed at
--            once and share the cookie jar, which holds the newer token already; an access token
--            is issued, nothing is rotated
--   reused   rotated earlier than that: whoever holds it copied it; the log-in is ended
--   ended    the log-in was ended already
--   unknown  no such token, or expired
CREATE FUNCTION rotate_refresh_token(old_hash bytea, new_hash bytea, ttl float8, grace float8)
RETURNS TABLE (outcome text, user_id bigint, login_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    token refresh_tokens%ROWTYPE;
    login logins%ROWTYPE;
BEGIN
    SELECT * INTO token FROM refresh_tokens t WHERE t.hash = old_hash FOR UPDATE;
    IF NOT FOUND OR token.expires_at <= now() THEN
        RETURN QUERY SELECT 'unknown', NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    SELECT * INTO login FROM logins l WHERE l.id = token.login_id FOR UPDATE;
    IF login.revoked_at IS NOT NULL THEN
        RETURN QUERY SELECT 'ended', login.user_id, login.id;
    ELSIF token.rotated_at IS NOT NULL AND token.rotated_at > now() - grace * interval '1 second'
    THEN
        RETURN QUERY SELECT 'grace', login.user_id, login.id;
    ELSIF token.rotated_at IS NOT NULL THEN
        UPDATE logins l SET revoked_at = now() WHERE l.id = login.id;
        RETURN QUERY SELECT 'reused', login.user_id, login.id;
    ELSE
        UPDATE refresh_tokens t SET rotated_at = now() WHERE t.hash = old_hash;
        INSERT INTO refresh_tokens (hash, login_id, expires_at)
        VALUES (new_hash, login.id, now() + ttl * interval '1 second');
        -- A device refreshes every few minutes for as long as it stays logged in: its expired
        -- tokens go on the way, so a device holds the rows of one refresh-token lifetime.
        DELETE FROM refresh_tokens t WHERE t.login_id = login.id AND t.expires_at < now();
        RETURN QUERY SELECT 'rotated', login.user_id, login.id;
    END IF;
END
$$;
