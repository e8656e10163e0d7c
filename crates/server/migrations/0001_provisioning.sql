-- Provisioning state (spec/provisioning.md §7). Every budget change is one statement or
-- one transaction; the WHERE clauses below in the code are what prevents double spends.

-- One row per sealed capsule whose key the server may release.
CREATE TABLE models (
    -- The capsule id, lowercase hex (32 characters).
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    -- AES-256-GCM under the server's master key, associated data = the capsule id bytes:
    -- nonce (12) || ciphertext (32) || tag (16). Never the key itself.
    sealed_key BLOB NOT NULL,
    -- Most queries one licence may be granted in total; NULL = no limit.
    max_queries INTEGER CHECK (max_queries IS NULL OR max_queries >= 1),
    -- Last day (UTC, YYYY-MM-DD) any licence of this model may run; NULL = none.
    expires TEXT,
    created_at INTEGER NOT NULL
) STRICT;

-- One row per licence; provisioned to at most one enclave instance, ever.
CREATE TABLE licences (
    -- "lic_" || 32 hex characters.
    id TEXT PRIMARY KEY NOT NULL,
    model_id TEXT NOT NULL REFERENCES models (id),
    -- SHA-256 of the licence token; the token itself is never stored.
    token_sha256 BLOB NOT NULL UNIQUE,
    total_queries INTEGER NOT NULL CHECK (total_queries >= 1),
    expires TEXT,
    created_at INTEGER NOT NULL,
    -- Set once, atomically, by a successful setup; NULL until then.
    instance_id TEXT,
    enclave_key TEXT,
    platform TEXT,
    measurement TEXT,
    platform_id TEXT,
    provisioned_at INTEGER,
    -- Sequence number of the last top-up token issued (0 = none).
    topup_seq INTEGER NOT NULL DEFAULT 0 CHECK (topup_seq >= 0),
    -- Usage the instance last reported with a top-up request, and when.
    last_used INTEGER,
    last_used_at INTEGER
) STRICT;

CREATE INDEX licences_model ON licences (model_id);

-- Outstanding single-use setup nonces; a row is deleted by the setup that uses it.
CREATE TABLE setup_nonces (
    nonce BLOB PRIMARY KEY NOT NULL,
    licence_id TEXT NOT NULL REFERENCES licences (id),
    expires_at INTEGER NOT NULL
) STRICT;

CREATE INDEX setup_nonces_expiry ON setup_nonces (expires_at);
CREATE INDEX setup_nonces_licence ON setup_nonces (licence_id);
