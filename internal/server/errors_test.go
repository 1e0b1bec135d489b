package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// The store's errors reach the client as what they mean: a record changed
// under the request, or writers that kept winning (not "the vTPM changed",
// which an evidence push or a host's report would not understand).
func TestStoreErrors(t *testing.T) {
	r := httptest.NewRequest("POST", "/v1/vtpms", nil)
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct {
		err    error
		status int
		code   api.Code
		msg    string
	}{
		{fmt.Errorf("vtpm x: %w", store.ErrConflict), http.StatusConflict, api.CodeConflict, "The vTPM changed while the request ran; retry it."},
		{fmt.Errorf("%w: %w", store.ErrContended, errors.New("40001")), http.StatusConflict, api.CodeConflict,
			"Other requests were changing the same records at the same moment; nothing was changed. Retry it."},
		{&store.UnavailableError{Err: errors.New("connection refused")}, http.StatusServiceUnavailable, api.CodeStoreUnavailable,
			"The server cannot reach its database; the request was not carried out. Retry it shortly."},
	} {
		got := toAPIError(c.err, log, r)
		if got.Status != c.status || got.Code != c.code || got.Message != c.msg {
			t.Errorf("%v: %d %s %q, want %d %s %q", c.err, got.Status, got.Code, got.Message, c.status, c.code, c.msg)
		}
	}
}
