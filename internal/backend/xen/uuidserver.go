package xen

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"

	"github.com/vtpmd/vtpmd/api"
)

// UUIDServiceOwner owns the registrations the UUID service makes: the
// caller's to use and release, never reported as drift.
const UUIDServiceOwner = "uuid-service"

// UUIDServer is the original design's UUID service, which Nova called at
// http://keylime_vm:8081 before spawning a vTPM: GET / answers 200 with
// {"uuid": "<uuid>"}, a fresh vTPM UUID registered with the manager's
// group. Any other method or path is an error, with a JSON body.
func UUIDServer(m Manager, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path != "/":
			fail(w, http.StatusNotFound, api.CodeNotFound, "The UUID service serves only GET /.")
			return
		case r.Method != http.MethodGet:
			w.Header().Set("Allow", http.MethodGet)
			fail(w, http.StatusMethodNotAllowed, api.CodeMethodNotAllowed, "The UUID service serves only GET /.")
			return
		}
		id, err := m.Register(r.Context(), UUIDServiceOwner)
		switch {
		case errors.Is(err, ErrGroupFull):
			fail(w, http.StatusInsufficientStorage, api.CodeGroupFull, err.Error()+"; release vTPMs or register them to another group.")
			return
		case err != nil:
			log.Error("registering a vTPM UUID", "err", err)
			fail(w, http.StatusInternalServerError, api.CodeInternal, "Registering the UUID with the VTPM manager failed; the server log has the details.")
			return
		}
		log.Info("vTPM UUID registered", "uuid", id)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"uuid": id.String()})
	})
}

func fail(w http.ResponseWriter, status int, code api.Code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(api.ErrorBody{Error: api.Error{Code: code, Message: msg}})
}
