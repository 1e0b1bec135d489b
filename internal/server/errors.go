package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"syscall"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// APIError is a failure the client should see as it is: the one error type
// handlers return for anything that is not a server fault.
type APIError struct {
	Status  int
	Code    string
	Message string
}

func (e *APIError) Error() string { return e.Code + ": " + e.Message }

func apiErr(status int, code, msg string) *APIError { return &APIError{status, code, msg} }

// Stable error codes of the API besides those of internal/spec.
const (
	CodeInvalidJSON       = "invalid_json"
	CodeBodyTooLarge      = "body_too_large"
	CodeInvalidInstanceID = "invalid_instance_id"
	CodeInvalidProject    = "invalid_project"
	CodeInvalidParameter  = "invalid_parameter"
	CodeNoVTPMRequested   = "no_vtpm_requested"
	CodeNotFound          = "not_found"
	CodeMethodNotAllowed  = "method_not_allowed"
	CodeAlreadyExists     = "already_exists"
	CodeConflict          = "conflict"
	CodeNotReady          = "not_ready"
	CodeNotSupported      = "not_supported"
	CodeForbidden         = "forbidden"
	CodeInternal          = "internal"
	CodeStorageFull       = "storage_full"
)

// toAPIError is the one place that maps errors to HTTP. Anything it does
// not recognise is a server fault: logged in full, shown to the client only
// as a generic message.
func toAPIError(err error, log *slog.Logger, r *http.Request) *APIError {
	var ae *APIError
	var se *spec.Error
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.As(err, &se):
		status := http.StatusBadRequest
		if se.Code == spec.CodeNoValidHost {
			status = http.StatusConflict
		}
		return apiErr(status, string(se.Code), se.Message)
	case errors.As(err, &mbe):
		return apiErr(http.StatusRequestEntityTooLarge, CodeBodyTooLarge, fmt.Sprintf("The request body is larger than the %d bytes this route accepts.", mbe.Limit))
	case errors.Is(err, store.ErrNotFound):
		return apiErr(http.StatusNotFound, CodeNotFound, "No such vTPM.")
	case errors.Is(err, store.ErrExists):
		return apiErr(http.StatusConflict, CodeAlreadyExists, "This instance already has a vTPM.")
	case errors.Is(err, store.ErrConflict):
		return apiErr(http.StatusConflict, CodeConflict, "The vTPM changed while the request ran; retry it.")
	case errors.Is(err, store.ErrFull), errors.Is(err, syscall.ENOSPC):
		// Logged: the operator must free space. Nothing was changed.
		log.Error("request failed: disk full", "method", r.Method, "path", r.URL.Path, "err", err)
		return apiErr(http.StatusInsufficientStorage, CodeStorageFull, "The server's disk is full; nothing was changed. Retry once the operator has freed space.")
	}
	log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	return apiErr(http.StatusInternalServerError, CodeInternal, "Internal error; the server log has the details.")
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
	writeJSON(w, e.Status, api.ErrorBody{Error: api.Error{Code: e.Code, Message: e.Message}})
}
