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
