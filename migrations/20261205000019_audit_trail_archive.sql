-- audit.trail showed the hot audit log only: the months the retention job moves to
-- archive.audit_log after 13 months vanished from it, though they are kept for 7 years and the
-- trail is what compliance is told to query (found in review, session 22). It now reads the
-- archive too; audit.data_access_trail does the same for reads of personal data.
CREATE OR REPLACE VIEW audit.trail AS
SELECT event_id, created_at, event_type, entity_type, entity_id, before_state, after_state,
       caller, ip_address, user_agent, correlation_id, journal_sequence
FROM audit.audit_log
UNION ALL
SELECT event_id, created_at, event_type, entity_type, entity_id, before_state, after_state,
       caller, ip_address, user_agent, correlation_id, journal_sequence
FROM archive.audit_log
UNION ALL
SELECT event_id, created_at, event_type, entity_type, entity_id, before_state, after_state,
       caller, ip_address, user_agent, correlation_id, journal_sequence
FROM audit.ledger_requests;

-- Every read of personal data, hot and archived.
CREATE VIEW audit.data_access_trail AS
SELECT access_id, created_at, subject_user_id, entity_type, fields, reason, caller, ip_address, user_agent,
       correlation_id
FROM audit.data_access_log
UNION ALL
SELECT access_id, created_at, subject_user_id, entity_type, fields, reason, caller, ip_address, user_agent,
       correlation_id
FROM archive.data_access_log;
