-- Wallet addresses are stored in one canonical form since session 4 (src/directory/address.rs):
-- segwit and Sui in lower case, Ethereum in its EIP-55 checksum case. Rows written before that
-- were stored as sent, so one address could sit under two spellings and UNIQUE (chain, address)
-- would let a second user register it.
-- - Segwit and Sui: their canonical form is lower case, so the old rows are rewritten to it.
-- - Ethereum: the EIP-55 case needs Keccak-256, which PostgreSQL lacks, so old rows keep their
--   spelling and uniqueness is enforced on the lower-cased address instead (hex is one address
--   whatever its case). The store's ON CONFLICT DO NOTHING covers this index too.
-- If two rows already hold one address under two spellings, this migration fails on the unique
-- index/constraint and names the address: resolve that duplicate by hand, then migrate again.
UPDATE directory.wallets SET address = lower(address)
WHERE address <> lower(address)
  AND (chain = 'sui' OR (chain = 'bitcoin' AND lower(address) LIKE 'bc1%'));

CREATE UNIQUE INDEX wallets_ethereum_address_any_case ON directory.wallets (lower(address))
    WHERE chain = 'ethereum';
