package store

import (
	"context"
	"fmt"
	"strings"
)

// migrations are applied in order, each once, each in its own transaction.
// Append only: never edit one that has shipped.
var migrations = []string{
	1: `
CREATE TABLE hosts (
	name        TEXT PRIMARY KEY,
	traits      TEXT NOT NULL,          -- JSON array, sorted
	capacity    INTEGER NOT NULL,
	backend     TEXT NOT NULL,
	seen_at     TEXT NOT NULL
);
CREATE TABLE vtpms (
	instance_id     TEXT PRIMARY KEY,
	project         TEXT NOT NULL,
	version         TEXT NOT NULL,
	model           TEXT NOT NULL,
	secret_security TEXT NOT NULL,
	hypervisor      TEXT NOT NULL,
	keys            TEXT NOT NULL,      -- JSON array
	host            TEXT NOT NULL REFERENCES hosts(name),
	desired         TEXT NOT NULL,
	phase           TEXT NOT NULL,
	reason          TEXT NOT NULL,
	secret_id       TEXT NOT NULL,
	eks             TEXT NOT NULL,      -- JSON array of EK records
	generation      INTEGER NOT NULL,
	created_at      TEXT NOT NULL,
	updated_at      TEXT NOT NULL
);
CREATE INDEX vtpms_project ON vtpms(project, instance_id);
CREATE INDEX vtpms_host ON vtpms(host, instance_id);
CREATE TABLE events (
	id          INTEGER PRIMARY KEY AUTOINCREMENT,
	at          TEXT NOT NULL,
	actor       TEXT NOT NULL,
	instance_id TEXT NOT NULL,
	action      TEXT NOT NULL,
	detail      TEXT NOT NULL
);
CREATE INDEX events_instance ON events(instance_id, id);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
`,
	// The libvirt domain a vTPM is attached to ('' for none).
	2: `ALTER TABLE vtpms ADD COLUMN domain TEXT NOT NULL DEFAULT '';`,
	// An instance's attestation: registration, last evidence, policy, verdict.
	3: `
CREATE TABLE attestations (
	instance_id TEXT PRIMARY KEY,
	doc         TEXT NOT NULL,          -- JSON, see Attestation
	updated_at  TEXT NOT NULL
);`,
	// When a registered subject's evidence is overdue ('' for never), so
	// that finding overdue ones is an index scan.
	4: `
ALTER TABLE attestations ADD COLUMN stale_at TEXT NOT NULL DEFAULT '';
CREATE INDEX attestations_stale_at ON attestations(stale_at) WHERE stale_at != '';`,
	// Named measured-boot policies; project '' is the operator's, shared.
	5: `
CREATE TABLE policies (
	project     TEXT NOT NULL,
	name        TEXT NOT NULL,
	doc         TEXT NOT NULL,          -- JSON, see Policy
	created_at  TEXT NOT NULL,
	PRIMARY KEY (project, name)
);`,
	// Webhook deliveries, written in the transaction of the change they
	// announce (a transactional outbox): none is lost to a crash.
	6: `
CREATE TABLE outbox (
	id          INTEGER PRIMARY KEY AUTOINCREMENT,
	payload     TEXT NOT NULL,          -- JSON
	attempts    INTEGER NOT NULL DEFAULT 0,
	next_at     TEXT NOT NULL,          -- sortable UTC time
	created_at  TEXT NOT NULL
);`,
	// A host's credential for the key manager (Hyper-V hosts fetch their
	// instances' keys with it): SHA-256 of its bearer token.
	7: `
CREATE TABLE host_credentials (
	host        TEXT PRIMARY KEY REFERENCES hosts(name),
	token_hash  BLOB NOT NULL UNIQUE,
	created_at  TEXT NOT NULL
);`,
	// Secrets tenants stored through the API (key material such as
	// os_vtpm_keys), as opposed to the vTPMs' own: kept by the key
	// manager, listed here so that nothing takes them for orphans.
	8: `
CREATE TABLE secrets (
	id          TEXT PRIMARY KEY,
	project     TEXT NOT NULL,
	created_at  TEXT NOT NULL
);`,
	// Each vTPM an instance id is given is a new incarnation, and events
	// belong to one: a deleted vTPM's history (maybe another project's) is
	// not the next one's. Existing vTPMs get one, with their events from
	// their "created" on; older events belong to none. The append-only
	// trigger steps aside for that one update.
	9: `
ALTER TABLE vtpms ADD COLUMN incarnation TEXT NOT NULL DEFAULT '';
UPDATE vtpms SET incarnation = lower(hex(randomblob(16)));
ALTER TABLE events ADD COLUMN incarnation TEXT NOT NULL DEFAULT '';
DROP TRIGGER events_no_update;
UPDATE events SET incarnation = (SELECT v.incarnation FROM vtpms v WHERE v.instance_id = events.instance_id)
	WHERE instance_id IN (SELECT instance_id FROM vtpms)
	AND id >= (SELECT MAX(c.id) FROM events c WHERE c.instance_id = events.instance_id AND c.action = 'created');
CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
DROP INDEX events_instance;
CREATE INDEX events_instance ON events(instance_id, incarnation, id);`,
	// Where the host's agent last found a vTPM served ('' for none): the
	// API answers from the record, never from the host.
	10: `
ALTER TABLE vtpms ADD COLUMN data_socket TEXT NOT NULL DEFAULT '';
ALTER TABLE vtpms ADD COLUMN ctrl_socket TEXT NOT NULL DEFAULT '';`,
	// Hosts' heartbeats (when the agent was last heard from, registering
	// included, and which vtpmd it runs) and the operator's drain (1: no
	// new vTPMs placed there).
	11: `
ALTER TABLE hosts RENAME COLUMN seen_at TO heartbeat_at;
ALTER TABLE hosts ADD COLUMN version TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;`,
	// Enrolment: the operator's one-time join tokens, kept only as their
	// SHA-256 (hex), and the client certificates the host CA issued, by
	// serial (hex): a certificate is honoured only while its row is here
	// unrevoked (revoked_at '').
	12: `
CREATE TABLE join_tokens (
	token_sha256 TEXT PRIMARY KEY,
	host         TEXT NOT NULL,
	expires_at   TEXT NOT NULL
);
CREATE INDEX join_tokens_host ON join_tokens(host);
CREATE TABLE host_certificates (
	serial      TEXT PRIMARY KEY,
	host        TEXT NOT NULL,
	not_after   TEXT NOT NULL,
	revoked_at  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX host_certificates_host ON host_certificates(host);`,
	// Per-host watch revisions (see WatchVTPMs): each host's counter,
	// bumped by every transaction writing its vTPMs, and its horizon, the
	// highest revision of a tombstone pruned; every vTPM row carries the
	// revision of its last write, and a vTPM that left a host leaves a
	// tombstone there for a while. Existing vTPMs are revision 1.
	13: `
CREATE TABLE watch_revisions (
	host        TEXT PRIMARY KEY,
	revision    BIGINT NOT NULL,
	horizon     BIGINT NOT NULL
);
ALTER TABLE vtpms ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
INSERT INTO watch_revisions (host, revision, horizon) SELECT DISTINCT host, 1, 0 FROM vtpms;
UPDATE vtpms SET revision = 1;
CREATE INDEX vtpms_host_revision ON vtpms(host, revision);
CREATE TABLE vtpm_tombstones (
	host        TEXT NOT NULL,
	instance_id TEXT NOT NULL,
	incarnation TEXT NOT NULL,
	revision    BIGINT NOT NULL,
	deleted_at  TEXT NOT NULL           -- sortable UTC time
);
CREATE INDEX vtpm_tombstones_host ON vtpm_tombstones(host, revision);`,
	// Drift checks (see AskDrift): the operator's requests to a host's
	// agent, counted, whether the last asks for repair, and the agent's
	// last answer (which request, its findings as JSON, when).
	14: `
ALTER TABLE hosts ADD COLUMN drift_asked BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN drift_repair INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN drift_answered BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN drift_findings TEXT NOT NULL DEFAULT '[]';
ALTER TABLE hosts ADD COLUMN drift_at TEXT NOT NULL DEFAULT '';`,
	// The swtpm process serving a vTPM, as its agent last found it (0:
	// none, or one vtpmd does not run).
	15: `ALTER TABLE vtpms ADD COLUMN swtpm_pid INTEGER NOT NULL DEFAULT 0;`,
	// Whether a client (a guest's QEMU) held the vTPM's control channel
	// when its agent last looked (1) or not (0).
	16: `ALTER TABLE vtpms ADD COLUMN guest_connected INTEGER NOT NULL DEFAULT 0;`,
	// Attestation records of instances that have no vTPM, which earlier
	// versions could leave behind: every delete of a vTPM removes its
	// record now, so a create no longer needs to.
	17: `DELETE FROM attestations WHERE instance_id NOT LIKE 'host:%' AND instance_id NOT IN (SELECT instance_id FROM vtpms);`,
	// Background work done once by servers sharing the database (see
	// outbox.go and lease.go). Each webhook delivery names its instance
	// (deliveries of one go out in order; those queued before have none,
	// and keep the order they were queued in), carries an id that stays
	// the same on every attempt, and is claimed by one server at a time
	// until claimed_until (sortable UTC time; '' unclaimed). A lease
	// names the server doing a periodic job until expires_at.
	18: `
ALTER TABLE outbox ADD COLUMN instance_id TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN delivery_id TEXT NOT NULL DEFAULT '';
UPDATE outbox SET delivery_id = lower(hex(randomblob(16)));
ALTER TABLE outbox ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN claimed_until TEXT NOT NULL DEFAULT '';
CREATE INDEX outbox_instance ON outbox(instance_id, id);
CREATE TABLE leases (
	name        TEXT PRIMARY KEY,
	holder      TEXT NOT NULL,
	expires_at  TEXT NOT NULL           -- sortable UTC time
);`,
	// Requests for fresh evidence (see AskRefresh), by attestation
	// subject, until its agent collects them: any server may take the
	// request, and any the agent's long poll.
	19: `
CREATE TABLE refresh_requests (
	subject      TEXT PRIMARY KEY,
	requested_at TEXT NOT NULL
);`,
	// Keys every server replica shares, each sealed under the deployment's
	// master key (internal/keyring): the embedded key manager's secrets
	// (kind 'secret', named by their UUID) and the deployment's own keys
	// (kind 'deployment': the CAs, the verdict signing key, the
	// registration ticket key). master_key holds the one row naming the
	// master key every blob is sealed under.
	20: `
CREATE TABLE sealed_keys (
	kind        TEXT NOT NULL,
	name        TEXT NOT NULL,
	master_key  TEXT NOT NULL,
	blob        BLOB NOT NULL,
	PRIMARY KEY (kind, name)
);
CREATE TABLE master_key (
	id          TEXT NOT NULL
);`,
	// When each staged secret (sealed key of kind 'staged': a vTPM secret
	// its owner's request read from a key manager that scopes secrets to
	// their owner, kept for the host's agent) stops being given out
	// (sortable UTC time).
	21: `
CREATE TABLE staged_secrets (
	name        TEXT PRIMARY KEY,
	expires_at  TEXT NOT NULL
);`,
	// The operator's requests that a host's agent look at a libvirt domain
	// whose vTPM (Nova's) vtpmd is to take over (see AskAdoption), one per
	// instance and host, until the server that asked has the answers.
	22: `
CREATE TABLE adoptions (
	host         TEXT NOT NULL,
	instance_id  TEXT NOT NULL,
	id           TEXT NOT NULL,
	domain       TEXT NOT NULL,
	secret_id    TEXT NOT NULL,
	answer       TEXT NOT NULL,      -- JSON, the agent's; '' until it answers
	asked_at     TEXT NOT NULL,
	PRIMARY KEY (host, instance_id)
);`,
	// State bundles (see transfer.go and backup.go): the servers' requests
	// that a host's agent export a vTPM's state as a bundle or import one,
	// until the server that asked has the answer; the bundles the servers
	// hold (backups), a few generations per vTPM; and each vTPM's bundle
	// generations: the last handed out, and the newest a server received
	// (older ones are stale).
	23: `
CREATE TABLE state_transfers (
	id           TEXT PRIMARY KEY,
	host         TEXT NOT NULL,
	instance_id  TEXT NOT NULL,
	incarnation  TEXT NOT NULL,
	kind         TEXT NOT NULL,      -- export | import
	generation   INTEGER NOT NULL,
	bundle       BLOB NOT NULL,      -- import: the bundle; export: the answer's
	answered     INTEGER NOT NULL,   -- 1 once the agent answered
	code         TEXT NOT NULL,      -- the agent's refusal; '' for none
	message      TEXT NOT NULL,
	asked_at     TEXT NOT NULL
);
CREATE INDEX state_transfers_host ON state_transfers (host, answered);
CREATE TABLE state_backups (
	instance_id  TEXT NOT NULL,
	incarnation  TEXT NOT NULL,
	generation   INTEGER NOT NULL,
	reason       TEXT NOT NULL,      -- manual | periodic | stop
	source_host  TEXT NOT NULL,
	created_at   TEXT NOT NULL,
	bundle       BLOB NOT NULL,
	PRIMARY KEY (instance_id, generation)
);
CREATE TABLE bundle_generations (
	instance_id  TEXT PRIMARY KEY,
	incarnation  TEXT NOT NULL,
	handed_out   INTEGER NOT NULL,
	newest       INTEGER NOT NULL
);`,
	// A vTPM's resize awaiting confirm or revert: JSON (see Resize), ''
	// for none.
	24: `ALTER TABLE vtpms ADD COLUMN resize TEXT NOT NULL DEFAULT '';`,
	// Cold migrations (see migration.go): one row per vTPM being moved,
	// with the step it reached, so that a server that died mid-move (or
	// another one) continues from there; the bundle once exported.
	25: `
CREATE TABLE vtpm_migrations (
	instance_id  TEXT PRIMARY KEY,
	incarnation  TEXT NOT NULL,
	source       TEXT NOT NULL,
	target       TEXT NOT NULL,
	step         TEXT NOT NULL,      -- stopping | exporting | importing | cleaning
	was_running  INTEGER NOT NULL,   -- 1: started again on the target once moved
	generation   INTEGER NOT NULL,   -- the bundle's, once exported; 0 before
	bundle       BLOB NOT NULL,      -- the bundle exported; empty before
	actor        TEXT NOT NULL,
	started_at   TEXT NOT NULL,
	updated_at   TEXT NOT NULL
);`,
	// Shelved vTPMs: a vTPM shelved, or evacuated from a host that is
	// gone, has no host (vtpms.host NULL; rebuilt, as SQLite alters no
	// constraint) until it is unshelved; the server keeps its bundle
	// meanwhile (shelved_bundles), until the import on its new host
	// proved it opens. from_host is the host it left; reason says how
	// (shelve | evacuate).
	26: `
CREATE TABLE vtpms_next (
	instance_id     TEXT PRIMARY KEY,
	project         TEXT NOT NULL,
	version         TEXT NOT NULL,
	model           TEXT NOT NULL,
	secret_security TEXT NOT NULL,
	hypervisor      TEXT NOT NULL,
	keys            TEXT NOT NULL,
	host            TEXT REFERENCES hosts(name),
	desired         TEXT NOT NULL,
	phase           TEXT NOT NULL,
	reason          TEXT NOT NULL,
	secret_id       TEXT NOT NULL,
	eks             TEXT NOT NULL,
	generation      INTEGER NOT NULL,
	created_at      TEXT NOT NULL,
	updated_at      TEXT NOT NULL,
	domain          TEXT NOT NULL DEFAULT '',
	incarnation     TEXT NOT NULL DEFAULT '',
	data_socket     TEXT NOT NULL DEFAULT '',
	ctrl_socket     TEXT NOT NULL DEFAULT '',
	revision        BIGINT NOT NULL DEFAULT 0,
	swtpm_pid       INTEGER NOT NULL DEFAULT 0,
	guest_connected INTEGER NOT NULL DEFAULT 0,
	resize          TEXT NOT NULL DEFAULT ''
);
INSERT INTO vtpms_next (instance_id, project, version, model, secret_security, hypervisor, keys, host, desired, phase, reason,
	secret_id, eks, generation, created_at, updated_at, domain, incarnation, data_socket, ctrl_socket, revision, swtpm_pid, guest_connected, resize)
	SELECT instance_id, project, version, model, secret_security, hypervisor, keys, host, desired, phase, reason,
	secret_id, eks, generation, created_at, updated_at, domain, incarnation, data_socket, ctrl_socket, revision, swtpm_pid, guest_connected, resize FROM vtpms;
DROP TABLE vtpms;
ALTER TABLE vtpms_next RENAME TO vtpms;
CREATE INDEX vtpms_project ON vtpms(project, instance_id);
CREATE INDEX vtpms_host ON vtpms(host, instance_id);
CREATE INDEX vtpms_host_revision ON vtpms(host, revision);
CREATE TABLE shelved_bundles (
	instance_id  TEXT PRIMARY KEY,
	incarnation  TEXT NOT NULL,
	generation   INTEGER NOT NULL,
	reason       TEXT NOT NULL,      -- shelve | evacuate
	from_host    TEXT NOT NULL,
	created_at   TEXT NOT NULL,
	bundle       BLOB NOT NULL
);`,
	// Live migrations share vtpm_migrations with cold ones: live says
	// which; its steps are preparing | sending | cleaning, and bundle
	// holds the destination's description (Incoming) once prepared.
	27: `ALTER TABLE vtpm_migrations ADD COLUMN live INTEGER NOT NULL DEFAULT 0;`,
	// The key broker (see broker.go): tenants' secrets that vtpmd releases
	// to attested instances, their payload in the key manager (key_id);
	// and each release to an instance's vTPM, until revoked (revoked_at
	// set, with the reason), and whether the instance's agent was told of
	// the revocation (its long poll takes it).
	28: `
CREATE TABLE broker_secrets (
	project          TEXT NOT NULL,
	name             TEXT NOT NULL,
	key_id           TEXT NOT NULL,
	release_to       TEXT NOT NULL,      -- JSON array of instance ids
	policy           TEXT NOT NULL,      -- a named policy the instance must be judged by; '' for none
	max_evidence_age BIGINT NOT NULL,    -- milliseconds
	created_at       TEXT NOT NULL,
	PRIMARY KEY (project, name)
);
CREATE TABLE secret_releases (
	project      TEXT NOT NULL,
	name         TEXT NOT NULL,
	instance_id  TEXT NOT NULL,
	incarnation  TEXT NOT NULL,
	released_at  TEXT NOT NULL,
	releases     BIGINT NOT NULL,
	revoked_at   TEXT NOT NULL DEFAULT '',
	reason       TEXT NOT NULL DEFAULT '',
	told         INTEGER NOT NULL DEFAULT 0,
	PRIMARY KEY (project, name, instance_id)
);
CREATE INDEX secret_releases_instance ON secret_releases(instance_id, revoked_at);`,
	// What the console sorts and filters instances by, on the vTPM's row
	// so that a page of 10,000 is an index walk with no join: its
	// attestation's verdict ('' for none), the named policy it copied, and
	// its last genuine evidence to the minute (PutAttestation keeps them);
	// indexes for the other columns it sorts by; and the verdict changes
	// by time, for the fleet's chart.
	29: `
ALTER TABLE vtpms ADD COLUMN verdict TEXT NOT NULL DEFAULT '';
ALTER TABLE vtpms ADD COLUMN policy_name TEXT NOT NULL DEFAULT '';
ALTER TABLE vtpms ADD COLUMN evidence_at TEXT NOT NULL DEFAULT '';
UPDATE vtpms SET
	verdict = COALESCE((SELECT json_extract(a.doc, '$.verdict') FROM attestations a WHERE a.instance_id = vtpms.instance_id), ''),
	policy_name = COALESCE((SELECT json_extract(a.doc, '$.policy_name') FROM attestations a WHERE a.instance_id = vtpms.instance_id), ''),
	evidence_at = COALESCE((SELECT substr(json_extract(a.doc, '$.evidence_at'), 1, 16) || ':00.000000000Z' FROM attestations a WHERE a.instance_id = vtpms.instance_id), '');
CREATE INDEX vtpms_verdict ON vtpms(verdict, instance_id);
CREATE INDEX vtpms_verdict_evidence ON vtpms(verdict, evidence_at, instance_id);
CREATE INDEX vtpms_policy ON vtpms(policy_name, instance_id);
CREATE INDEX vtpms_evidence ON vtpms(evidence_at, instance_id);
CREATE INDEX vtpms_phase ON vtpms(phase, instance_id);
CREATE INDEX vtpms_version ON vtpms(version, instance_id);
CREATE INDEX events_action_at ON events(action, at);`,
	// An attestation record's logs (event log, IMA log, the policy's event
	// log) apart from the rest of it, so that reading a verdict, a token
	// or a release's conditions does not decode them (see
	// attestationLogs).
	30: `
ALTER TABLE attestations ADD COLUMN logs TEXT NOT NULL DEFAULT '{}';
UPDATE attestations SET
	logs = json_object('event_log', json_extract(doc, '$.event_log'), 'ima_log', json_extract(doc, '$.ima_log'),
		'policy_event_log', json_extract(doc, '$.policy_event_log')),
	doc = json_remove(doc, '$.event_log', '$.ima_log', '$.policy_event_log');`,
	// A policy's identity: a name can be deleted and made again, with
	// other values, and a project's policy can share its name with a
	// shared one; a copy (the attestation's policy_id, and the vTPM's row
	// for the console) names the policy it was made from. Existing copies
	// are matched to the policy their name finds (the project's own, else
	// the shared one) only if its values are still the copy's; a copy of a
	// policy since replaced names none (its event log compared in the
	// attestation's logs, apart since migration 30). The console sorts a shelved vTPM
	// (no host) as host ''. And the web console's sessions,
	// which any replica checks and ending one ends it everywhere: a
	// sign-in link (kind 'link') or a signed-in browser ('session', or
	// 'keystone' when its cookie is a Keystone token), by the SHA-256 of
	// its secret, with whom it signs in.
	31: `
ALTER TABLE policies ADD COLUMN id TEXT NOT NULL DEFAULT '';
UPDATE policies SET id = lower(hex(randomblob(16)));
CREATE UNIQUE INDEX policies_id ON policies(id);
CREATE TABLE policy_copies AS SELECT a.instance_id, (SELECT p.id FROM policies p
	WHERE p.name = json_extract(a.doc, '$.policy_name')
	AND p.project IN ('', COALESCE((SELECT v.project FROM vtpms v WHERE v.instance_id = a.instance_id), ''))
	AND json_extract(p.doc, '$.pcrs') IS json_extract(a.doc, '$.policy_pcrs')
	AND json_extract(p.doc, '$.digests') IS json_extract(a.doc, '$.policy_digests')
	AND json_extract(p.doc, '$.event_log') IS json_extract(a.logs, '$.policy_event_log')
	ORDER BY p.project DESC LIMIT 1) AS policy_id
	FROM attestations a WHERE json_extract(a.doc, '$.policy_name') IS NOT NULL;
DELETE FROM policy_copies WHERE policy_id IS NULL;
UPDATE attestations SET doc = json_set(doc, '$.policy_id', (SELECT c.policy_id FROM policy_copies c WHERE c.instance_id = attestations.instance_id))
	WHERE instance_id IN (SELECT instance_id FROM policy_copies);
ALTER TABLE vtpms ADD COLUMN policy_id TEXT NOT NULL DEFAULT '';
UPDATE vtpms SET policy_id = (SELECT c.policy_id FROM policy_copies c WHERE c.instance_id = vtpms.instance_id)
	WHERE instance_id IN (SELECT instance_id FROM policy_copies);
DROP TABLE policy_copies;
CREATE INDEX vtpms_policy_id ON vtpms(policy_id, instance_id);
CREATE INDEX vtpms_host_sort ON vtpms((COALESCE(host, '')), instance_id);
CREATE TABLE console_sessions (
	token_hash  TEXT PRIMARY KEY,       -- SHA-256 of the link's code or the cookie, hex
	kind        TEXT NOT NULL,          -- link | session | keystone
	name        TEXT NOT NULL,          -- who signs in (a certificate's or Keystone's user name)
	project     TEXT NOT NULL,          -- the one project seen; '' for the operator
	expires_at  TEXT NOT NULL,          -- sortable UTC time
	created_at  TEXT NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions(expires_at);`,
	// A broker secret's policy by identity as well as name: the policy the
	// name found when the secret was made (the project's own, else the
	// shared one), which a policy made again under that name is not.
	32: `
ALTER TABLE broker_secrets ADD COLUMN policy_id TEXT NOT NULL DEFAULT '';
UPDATE broker_secrets SET policy_id = COALESCE((SELECT p.id FROM policies p
	WHERE p.name = broker_secrets.policy AND p.project IN ('', broker_secrets.project)
	ORDER BY p.project DESC LIMIT 1), '')
	WHERE policy <> '';`,
	// Transfers an agent carries out apart from its watch: the run (one
	// start of its process) of the agent that registered the host last,
	// and the run that took each transfer, which its watch no longer hands
	// to that run; another run (the agent restarted) is handed it again.
	33: `
ALTER TABLE hosts ADD COLUMN agent_run TEXT NOT NULL DEFAULT '';
ALTER TABLE state_transfers ADD COLUMN taken_by TEXT NOT NULL DEFAULT '';`,
}

func (s *Store) migrate(ctx context.Context) error { return s.migrateTo(ctx, len(migrations)-1) }

// migrationLock is the PostgreSQL advisory lock key that serialises the
// migrations of every server sharing a database ("vtpmd" in ASCII).
const migrationLock = 0x767470_6d64

// migrateTo applies the migrations up to last (tests start from an older
// schema with it). On PostgreSQL it holds an advisory lock meanwhile, so
// that replicas starting together apply each migration once, the others
// waiting and then finding the schema current. A database whose schema is
// newer than this build's migrations is refused with ErrSchemaNewer: a
// newer vtpmd migrated it, and this one would misread its rows.
func (s *Store) migrateTo(ctx context.Context, last int) error {
	if s.pg {
		conn, err := s.db.Conn(ctx)
		if err != nil {
			return err
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, migrationLock); err != nil {
			return fmt.Errorf("taking the migration lock: %w", err)
		}
		// Unlocked before the connection goes back to the pool (a closed
		// session would drop it too).
		defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, migrationLock)
	}
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return err
	}
	if err := s.checkSchema(ctx, len(migrations)-1, false); err != nil {
		return err
	}
	for v := 1; v <= last; v++ {
		err := s.Update(ctx, func(tx *Tx) error {
			cur, err := tx.schemaVersion()
			if err != nil {
				return err
			}
			if cur >= v {
				return nil
			}
			ddl := migrations[v]
			if s.pg {
				ddl = postgresDDL(ddl)
			}
			if err := tx.script(ddl); err != nil {
				return fmt.Errorf("migration %d: %w", v, err)
			}
			_, err = tx.exec(`INSERT INTO schema_version (version) VALUES (?)`, v)
			return err
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// SchemaCurrent reports whether the database's schema is the one this
// build migrates to: ErrSchemaNewer if a newer vtpmd migrated it since,
// ErrSchemaOlder if it lacks migrations (another build's, or an
// interrupted start). Readiness checks call it.
func (s *Store) SchemaCurrent(ctx context.Context) error {
	return s.checkSchema(ctx, len(migrations)-1, true)
}

// checkSchema compares the database's schema version with want: newer is
// always an error, older only if exact.
func (s *Store) checkSchema(ctx context.Context, want int, exact bool) error {
	return s.View(ctx, func(tx *Tx) error {
		cur, err := tx.schemaVersion()
		switch {
		case err != nil:
			return err
		case cur > want:
			return fmt.Errorf("%w: the database is at schema version %d, this vtpmd knows versions up to %d; run the vtpmd that migrated it, or a newer one", ErrSchemaNewer, cur, want)
		case exact && cur < want:
			return fmt.Errorf("%w: the database is at schema version %d, this vtpmd needs %d", ErrSchemaOlder, cur, want)
		}
		return nil
	})
}

func (t *Tx) schemaVersion() (int, error) {
	var cur int
	err := t.queryRow(`SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&cur)
	return cur, err
}

// postgresDDL is a migration in PostgreSQL's words: the same tables, with
// its identity and byte types, and the append-only triggers in PL/pgSQL.
func postgresDDL(ddl string) string {
	return strings.NewReplacer(
		"INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
		" BLOB ", " BYTEA ",
		`CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;`,
		`CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS
	$$ BEGIN RAISE EXCEPTION 'events are append-only'; END $$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_delete BEFORE DELETE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only();`,
		// Migration 9's: the trigger alone, and random hex.
		`DROP TRIGGER events_no_update;`, `DROP TRIGGER events_no_update ON events;`,
		`CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;`,
		`CREATE TRIGGER events_no_update BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION events_append_only();`,
		`lower(hex(randomblob(16)))`, `md5(random()::text || clock_timestamp()::text)`,
		// Migration 29's: a JSON document's field.
		`json_extract(a.doc, '$.verdict')`, `(a.doc::jsonb->>'verdict')`,
		`json_extract(a.doc, '$.policy_name')`, `(a.doc::jsonb->>'policy_name')`,
		`json_extract(a.doc, '$.evidence_at')`, `(a.doc::jsonb->>'evidence_at')`,
		// Migration 30's: a document's logs moved to another.
		`json_object('event_log', json_extract(doc, '$.event_log'), 'ima_log', json_extract(doc, '$.ima_log'),
		'policy_event_log', json_extract(doc, '$.policy_event_log'))`,
		`jsonb_build_object('event_log', doc::jsonb->'event_log', 'ima_log', doc::jsonb->'ima_log',
		'policy_event_log', doc::jsonb->'policy_event_log')::text`,
		`json_remove(doc, '$.event_log', '$.ima_log', '$.policy_event_log')`,
		`(doc::jsonb - 'event_log' - 'ima_log' - 'policy_event_log')::text`,
		// Migration 31's: JSON values compared, and a field set.
		`json_extract(p.doc, '$.pcrs') IS json_extract(a.doc, '$.policy_pcrs')`, `(p.doc::jsonb->'pcrs') IS NOT DISTINCT FROM (a.doc::jsonb->'policy_pcrs')`,
		`json_extract(p.doc, '$.digests') IS json_extract(a.doc, '$.policy_digests')`, `(p.doc::jsonb->'digests') IS NOT DISTINCT FROM (a.doc::jsonb->'policy_digests')`,
		`json_extract(p.doc, '$.event_log') IS json_extract(a.logs, '$.policy_event_log')`, `(p.doc::jsonb->>'event_log') IS NOT DISTINCT FROM (a.logs::jsonb->>'policy_event_log')`,
		`json_set(doc, '$.policy_id', (SELECT c.policy_id FROM policy_copies c WHERE c.instance_id = attestations.instance_id))`,
		`jsonb_set(doc::jsonb, '{policy_id}', to_jsonb((SELECT c.policy_id FROM policy_copies c WHERE c.instance_id = attestations.instance_id)))::text`,
	).Replace(ddl)
}
