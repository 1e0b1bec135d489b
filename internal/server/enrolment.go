package server

import (
	"net/http"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/refusal"
)

// maxVersion bounds the version an agent reports.
const maxVersion = 128

// joinToken is the operator's (see routes): a one-time join token for
// the host the path names, valid for ?ttl= (a Go duration; default and
// bounds in internal/enrol).
func (s *Server) joinToken(w http.ResponseWriter, r *http.Request) error {
	var ttl time.Duration
	if raw := r.URL.Query().Get("ttl"); raw != "" {
		var err error
		if ttl, err = time.ParseDuration(raw); err != nil || ttl <= 0 {
			return refusal.Invalid(api.CodeInvalidParameter, "ttl is a duration such as 30m or 2h.")
		}
	}
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	host := r.PathValue("name")
	token, expires, err := s.Enrolment.JoinToken(r.Context(), c, host, ttl)
	if err != nil {
		return err
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusCreated, api.JoinToken{Host: host, Token: token, ExpiresAt: expires})
	return nil
}

// revokeHost is the operator's (see routes): every certificate of the
// host stops working at once, and its unused join tokens go.
func (s *Server) revokeHost(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	host := r.PathValue("name")
	rev, err := s.Enrolment.Revoke(r.Context(), c, host)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.HostRevocation{Host: host, Certificates: rev.Certificates, JoinTokens: rev.JoinTokens})
	return nil
}

// enroll is an agents' route with no caller: the join token is the proof.
func (s *Server) enroll(w http.ResponseWriter, r *http.Request) error {
	var req api.EnrollRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if req.JoinToken == "" {
		return refusal.Invalid(api.CodeInvalidParameter, "join_token is required: the operator's token from vtpmctl host add.")
	}
	e, err := s.Enrolment.Enroll(r.Context(), req.JoinToken, req.CSR, bearerToken(r))
	if err != nil {
		return err
	}
	writeEnrollment(w, e)
	return nil
}

// renew is a hosts' route: the calling host's next certificate.
func (s *Server) renew(w http.ResponseWriter, r *http.Request) error {
	var req api.RenewRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	e, err := s.Enrolment.Renew(r.Context(), hostName(r), req.CSR)
	if err != nil {
		return err
	}
	writeEnrollment(w, e)
	return nil
}

func writeEnrollment(w http.ResponseWriter, e enrol.Enrollment) {
	writeJSON(w, http.StatusOK, api.Enrollment{Host: e.Host, Certificate: e.Certificate.Raw,
		NotAfter: e.Certificate.NotAfter, CAChain: string(e.ChainPEM), TPMBound: e.TPMBound})
}

// heartbeat is a hosts' route: the heartbeat is the certificate's host's.
func (s *Server) heartbeat(w http.ResponseWriter, r *http.Request) error {
	var req api.HeartbeatRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	if len(req.Version) > maxVersion {
		return refusal.Invalid(api.CodeInvalidParameter, "version is at most 128 bytes.")
	}
	if err := s.VTPMs.Heartbeat(r.Context(), hostName(r), req.Version); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
