package api

import "time"

// Backup is a state bundle the server holds of a vTPM
// (/v1/vtpms/{id}/backups): its state, sealed with a key only the vTPM's
// secret gives, at CreatedAt.
type Backup struct {
	// Generation grows with every export of the vTPM's state.
	Generation int64 `json:"generation"`
	// Reason is why it was taken: manual, periodic or stop.
	Reason     string    `json:"reason"`
	SourceHost string    `json:"source_host"`
	CreatedAt  time.Time `json:"created_at"`
	// Size is the bundle's, in bytes.
	Size int `json:"size"`
}

// BackupList answers GET /v1/vtpms/{id}/backups, newest first.
type BackupList struct {
	Items []Backup `json:"items"`
}

// RestoreRequest asks for a vTPM's state to be replaced by a backup
// (POST /v1/vtpms/{id}/backups/restore); the vTPM must be stopped.
type RestoreRequest struct {
	// Generation is the backup's; 0 or absent for the newest.
	Generation int64 `json:"generation,omitempty"`
	// AllowRollback restores a generation older than the newest the
	// server recorded (refused with stale_bundle otherwise), recorded as
	// an event naming the caller.
	AllowRollback bool `json:"allow_rollback,omitempty"`
}

// MigrateRequest asks for a vTPM to move, cold, to another host (POST
// /v1/vtpms/{id}/migrate); the answer is the vTPM, on its new host.
type MigrateRequest struct {
	// Host is the host to move it to; absent for the one placement
	// chooses among the others.
	Host string `json:"host,omitempty"`
}

// LiveMigrateRequest asks for a vTPM to move with its running guest to
// another host (POST /v1/vtpms/{id}/live-migrate); the answer is the
// vTPM, on its new host, its guest running there.
type LiveMigrateRequest struct {
	// Host is the host to move it to; absent for the one placement
	// chooses among the others.
	Host string `json:"host,omitempty"`
}

// UnshelveRequest is the body of POST /v1/vtpms/{id}/unshelve.
type UnshelveRequest struct {
	// Host is where to place the vTPM; absent: the placement rules choose.
	Host string `json:"host,omitempty"`
}

// EvacuateRequest is the body of POST /v1/hosts/{name}/evacuate.
type EvacuateRequest struct {
	// Force evacuates a host whose agent still sends heartbeats: the
	// operator says it is gone (refused with host_not_down otherwise).
	Force bool `json:"force,omitempty"`
	// NewTPM gives a vTPM that has no backup a new TPM (a new EK; its
	// sealed data is lost) instead of refusing it.
	NewTPM bool `json:"new_tpm,omitempty"`
}

// EvacuateLiveRequest is the body of POST /v1/hosts/{name}/evacuate-live.
type EvacuateLiveRequest struct {
	// Target is the host to move the vTPMs to; absent: placement chooses,
	// for each, among the other hosts.
	Target string `json:"target,omitempty"`
	// MaxConcurrent is how many vTPMs move at a time, 1 to 8; absent: 1,
	// as Nova's max_concurrent_live_migrations.
	MaxConcurrent int `json:"max_concurrent,omitempty"`
}

// Evacuation answers POST /v1/hosts/{name}/evacuate and
// /v1/hosts/{name}/evacuate-live: what became of each vTPM of the host,
// in the order they finished, and the counts.
type Evacuation struct {
	Host  string          `json:"host"`
	Items []EvacuatedVTPM `json:"items"`
	Count map[string]int  `json:"count"` // by outcome
}

// EvacuatedVTPM is what became of one vTPM of an evacuated host.
type EvacuatedVTPM struct {
	InstanceID string `json:"instance_id"`
	// Outcome is restored (from its newest backup, its EK kept), new_tpm
	// (no backup: a new TPM), placed (never manufactured: placed again),
	// deleted (it was being deleted), shelved (it was being shelved: its
	// bundle was kept already), migrated (it was migrating away from the
	// host and its state had left it: the move is finished, nothing
	// lost), returned (it was migrating to the host: it is on the source
	// host again, with the state it had there), or refused (Code and
	// Message say why; nothing of it changed). Evacuating live (its
	// state kept, nothing lost): live_migrated (its guest running
	// throughout), cold_migrated (moved stopped), or refused (Code and
	// Message say why; it is still on the host, or its move, cut short,
	// goes on when asked again).
	Outcome string `json:"outcome"`
	Host    string `json:"host,omitempty"` // where it is now
	// Generation and BackupAt are the backup's restored: what changed in
	// the TPM after BackupAt is lost. For migrated and returned,
	// Generation is the migration's bundle's, and BackupAt absent.
	Generation int64      `json:"generation,omitempty"`
	BackupAt   *time.Time `json:"backup_at,omitempty"`
	Code       Code       `json:"code,omitempty"`
	Message    string     `json:"message,omitempty"`
}

// The outcomes of an evacuated vTPM.
const (
	EvacuatedRestored = "restored"
	EvacuatedNewTPM   = "new_tpm"
	EvacuatedPlaced   = "placed"
	EvacuatedDeleted  = "deleted"
	EvacuatedShelved  = "shelved"
	EvacuatedMigrated = "migrated"
	EvacuatedReturned = "returned"
	EvacuatedRefused  = "refused"
	// Evacuating live.
	EvacuatedLiveMigrated = "live_migrated"
	EvacuatedColdMigrated = "cold_migrated"
)

// EvacuationProgress is one line of the answer to POST
// /v1/hosts/{name}/evacuate or /v1/hosts/{name}/evacuate-live asked with
// Accept: application/x-ndjson: a first line with the Total of vTPMs to
// evacuate, then one per vTPM as its outcome is known (Item, the Done-th
// of Total), then a last line with the Result, or the Error that cut the
// evacuation short.
type EvacuationProgress struct {
	Done   int            `json:"done"`
	Total  int            `json:"total"`
	Item   *EvacuatedVTPM `json:"item,omitempty"`
	Result *Evacuation    `json:"result,omitempty"`
	Error  *Error         `json:"error,omitempty"`
	// Status is the HTTP status Error would have answered with.
	Status int `json:"status,omitempty"`
}
