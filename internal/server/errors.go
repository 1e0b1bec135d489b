package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"syscall"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// APIError is an error response: its status, its stable code and the
// message the client sees.
type APIError struct {
	Status  int
	Code    api.Code
	Message string
}

func (e *APIError) Error() string { return string(e.Code) + ": " + e.Message }

// statusOf is the HTTP status of each kind of refusal.
var statusOf = map[refusal.Kind]int{
	refusal.KindInvalid:         http.StatusBadRequest,
	refusal.KindUnauthenticated: http.StatusUnauthorized,
	refusal.KindForbidden:       http.StatusForbidden,
	refusal.KindNotFound:        http.StatusNotFound,
	refusal.KindConflict:        http.StatusConflict,
	refusal.KindUnavailable:     http.StatusServiceUnavailable,
}

// toAPIError is the one place that maps errors to HTTP: refusals by their
// kind, request semantics' by their code, the store's by what they mean.
// Anything it does not recognise is a server fault: logged in full, shown
// to the client only as a generic message.
func toAPIError(err error, log *slog.Logger, r *http.Request) *APIError {
	var re *refusal.Error
	var se *spec.Error
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &re) && statusOf[re.Kind] != 0:
		return &APIError{statusOf[re.Kind], re.Code, re.Message}
	case errors.As(err, &se):
		status := http.StatusBadRequest
		if se.Code == api.CodeNoValidHost {
			status = http.StatusConflict
		}
		return &APIError{status, se.Code, se.Message}
	case errors.As(err, &mbe):
		return &APIError{http.StatusRequestEntityTooLarge, api.CodeBodyTooLarge, fmt.Sprintf("The request body is larger than the %d bytes this route accepts.", mbe.Limit)}
	case errors.Is(err, store.ErrNotFound):
		return &APIError{http.StatusNotFound, api.CodeNotFound, "No such vTPM."}
	case errors.Is(err, store.ErrExists):
		return &APIError{http.StatusConflict, api.CodeAlreadyExists, "This instance already has a vTPM."}
	case errors.Is(err, store.ErrContended):
		return &APIError{http.StatusConflict, api.CodeConflict, "Other requests were changing the same records at the same moment; nothing was changed. Retry it."}
	case errors.Is(err, store.ErrConflict):
		return &APIError{http.StatusConflict, api.CodeConflict, "The vTPM changed while the request ran; retry it."}
	case errors.Is(err, store.ErrUnavailable):
		// Logged once per request: the operator sees the outage.
		log.Warn("request failed: store unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		return &APIError{http.StatusServiceUnavailable, api.CodeStoreUnavailable, "The server cannot reach its database; the request was not carried out. Retry it shortly."}
	case errors.Is(err, keyring.ErrUnavailable):
		log.Warn("request failed: key manager unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		return &APIError{http.StatusServiceUnavailable, api.CodeKeyManagerUnavailable, "The server cannot reach the key manager; the request was not carried out. Retry it shortly."}
	case errors.Is(err, keyring.ErrForbidden):
		return &APIError{http.StatusForbidden, api.CodeSecretNeedsOwner, "The key manager refused this caller the vTPM's secret: it is kept in its owner's project, and only a token of that project can use it."}
	case errors.Is(err, store.ErrFull), errors.Is(err, syscall.ENOSPC):
		// Logged: the operator must free space. Nothing was changed.
		log.Error("request failed: disk full", "method", r.Method, "path", r.URL.Path, "err", err)
		return &APIError{http.StatusInsufficientStorage, api.CodeStorageFull, "The server's disk is full; nothing was changed. Retry once the operator has freed space."}
	}
	log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	return &APIError{http.StatusInternalServerError, api.CodeInternal, "Internal error; the server log has the details."}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, e *APIError) {
	if e.Status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="vtpmd attestation agent"`)
	}
	if e.Code == api.CodeStoreUnavailable || e.Code == api.CodeKeyManagerUnavailable || e.Code == api.CodeIdentityUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	writeJSON(w, e.Status, api.ErrorBody{Error: api.Error{Code: e.Code, Message: e.Message}})
}
