package server

import (
	"context"
	"encoding/json"
	"net/http"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
)

// createBackup backs a vTPM up now (vtpms.Service.Backup): 201 with the
// backup.
func (s *Server) createBackup(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	b, err := s.VTPMs.Backup(r.Context(), c, r.PathValue("id"), store.BackupManual)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, backupView(*b))
	return nil
}

func (s *Server) listBackups(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	bs, err := s.VTPMs.Backups(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	out := api.BackupList{Items: make([]api.Backup, len(bs))}
	for i, b := range bs {
		out.Items[i] = backupView(b)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// restoreBackup replaces a stopped vTPM's state with a backup
// (vtpms.Service.Restore): 200 with the backup restored.
func (s *Server) restoreBackup(w http.ResponseWriter, r *http.Request) error {
	var req api.RestoreRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if req.Generation < 0 {
		return refusal.Invalid(api.CodeInvalidParameter, "generation is a backup's (1 or more), or 0 for the newest.")
	}
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	b, err := s.VTPMs.Restore(r.Context(), c, r.PathValue("id"), req.Generation, req.AllowRollback)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, backupView(*b))
	return nil
}

func backupView(b store.Backup) api.Backup {
	return api.Backup{Generation: b.Generation, Reason: b.Reason, SourceHost: b.SourceHost, CreatedAt: b.CreatedAt, Size: b.Size}
}

// migrateVTPM moves a vTPM, cold, to another host (vtpms.Service.Migrate):
// 200 with the vTPM on its new host once the move is done; the same
// request again continues a move that was cut short.
func (s *Server) migrateVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.MigrateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.moved(w, r, func(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
		return s.VTPMs.Migrate(ctx, c, id, req.Host)
	})
}

// liveMigrateVTPM moves a vTPM with its running guest to another host
// (vtpms.Service.LiveMigrate): 200 with the vTPM, on its new host.
func (s *Server) liveMigrateVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.LiveMigrateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.moved(w, r, func(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
		return s.VTPMs.LiveMigrate(ctx, c, id, req.Host)
	})
}

// shelveVTPM shelves a stopped vTPM (vtpms.Service.Shelve): 200 with the
// vTPM, shelved.
func (s *Server) shelveVTPM(w http.ResponseWriter, r *http.Request) error {
	return s.moved(w, r, s.VTPMs.Shelve)
}

// unshelveVTPM places a shelved vTPM on a host again and imports its
// state (vtpms.Service.Unshelve): 200 with the vTPM, stopped there.
func (s *Server) unshelveVTPM(w http.ResponseWriter, r *http.Request) error {
	var req api.UnshelveRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.moved(w, r, func(ctx context.Context, c tenant.Caller, id string) (*store.VTPM, error) {
		return s.VTPMs.Unshelve(ctx, c, id, req.Host)
	})
}

// moved answers a move the server finished (do): 200 with the vTPM.
func (s *Server) moved(w http.ResponseWriter, r *http.Request, do func(context.Context, tenant.Caller, string) (*store.VTPM, error)) error {
	return s.answerVTPM(w, r, http.StatusOK, do)
}

// evacuateHost moves the vTPMs of a host that is gone to other hosts
// (vtpms.Service.Evacuate): 200 with what became of each, streamed as
// evacuation says.
func (s *Server) evacuateHost(w http.ResponseWriter, r *http.Request) error {
	var req api.EvacuateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.evacuation(w, r, func(c tenant.Caller, progress func(api.EvacuationProgress)) (*api.Evacuation, error) {
		return s.VTPMs.Evacuate(r.Context(), c, r.PathValue("name"), req.Force, req.NewTPM, progress)
	})
}

// evacuateHostLive drains a host and moves its vTPMs, with their state,
// to other hosts (vtpms.Service.EvacuateLive): 200 with what became of
// each, streamed as evacuation says.
func (s *Server) evacuateHostLive(w http.ResponseWriter, r *http.Request) error {
	var req api.EvacuateLiveRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	return s.evacuation(w, r, func(c tenant.Caller, progress func(api.EvacuationProgress)) (*api.Evacuation, error) {
		return s.VTPMs.EvacuateLive(r.Context(), c, r.PathValue("name"), req.Target, req.MaxConcurrent, progress)
	})
}

// evacuation answers an evacuation that run makes for the caller: 200
// with what became of each vTPM. Asked with Accept: application/x-ndjson,
// the answer is streamed as api.EvacuationProgress lines: the count
// first, each vTPM as its outcome is known, then the result (or, once
// streaming began, the error that cut the evacuation short).
func (s *Server) evacuation(w http.ResponseWriter, r *http.Request, run func(tenant.Caller, func(api.EvacuationProgress)) (*api.Evacuation, error)) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	if r.Header.Get("Accept") != ndjson {
		out, err := run(c, nil)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, out)
		return nil
	}
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	streaming := false
	line := func(p api.EvacuationProgress) {
		if !streaming {
			w.Header().Set("Content-Type", ndjson)
			w.WriteHeader(http.StatusOK)
			streaming = true
		}
		enc.Encode(p)
		rc.Flush()
	}
	out, err := run(c, line)
	switch {
	case err != nil && !streaming:
		return err
	case err != nil:
		e := toAPIError(err, s.Log, r)
		line(api.EvacuationProgress{Error: &api.Error{Code: e.Code, Message: e.Message}, Status: e.Status})
	default:
		line(api.EvacuationProgress{Done: len(out.Items), Total: len(out.Items), Result: out})
	}
	return nil
}

// ndjson is the media type of a streamed answer: one JSON value a line.
const ndjson = "application/x-ndjson"
