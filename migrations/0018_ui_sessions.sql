-- The dashboard's browser sessions (issue 17), in the database so a restart keeps them and
-- every replica honours them (they lived in one process's memory before). The cookie carries
-- a random session id; only its SHA-256 is kept. A session opened with an API token names the
-- token (revoking it deletes its sessions; a token revoked or expired since the login is
-- checked on every request too); one opened with the configured bootstrap admin token keeps a
-- check of that token salted with the session, so changing REGISTRY_ADMIN_TOKEN ends them.
CREATE TABLE ui_sessions (
    id_hash     bytea PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('read', 'operate', 'admin')),
    token_id    uuid REFERENCES api_tokens (id) ON DELETE CASCADE,
    admin_check bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK ((token_id IS NULL) <> (admin_check IS NULL))
);
-- Logins delete the expired sessions (a range scan of this index); revocation finds a
-- token's sessions by the other.
CREATE INDEX ui_sessions_expires_idx ON ui_sessions (expires_at);
CREATE INDEX ui_sessions_token_idx ON ui_sessions (token_id);
