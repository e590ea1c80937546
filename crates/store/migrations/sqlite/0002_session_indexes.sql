-- The login-time sweep of expired sessions and "log out other devices"
-- must not scan the whole table inside the writer's transaction.
CREATE INDEX sessions_expires ON sessions (expires_at);
CREATE INDEX sessions_user ON sessions (user_id);
