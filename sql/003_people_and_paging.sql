-- Finding people by name: GET /user/search matches a case-insensitive prefix of the name.
-- The key is compared bytewise (COLLATE "C"), so a LIKE 'prefix%' becomes a range scan of this
-- index whatever the database's collation, and the same index returns the matches in order
-- (name, then id), so a search reads only the rows it returns.
CREATE INDEX users_name_search_idx ON users ((lower(name) COLLATE "C"), id);
