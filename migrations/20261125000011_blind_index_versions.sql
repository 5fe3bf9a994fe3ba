-- The email blind index gets a key version, like the sealed values: a new or changed email is
-- indexed under the active blind-index key, lookups try every configured key, and
-- `diboas-ledger rotate-keys` re-indexes the rows still under an older one (src/directory/rotation.rs).
-- Rows indexed before this migration were made under the only key there was: version 1.
ALTER TABLE directory.users ADD COLUMN email_index_version integer NOT NULL DEFAULT 1
    CHECK (email_index_version > 0);
