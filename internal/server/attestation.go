package server

import (
	"net/http"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/verifier"
)

// The attestation routes of an instance (/v1/vtpms/{id}/attestation/…)
// and of a host's own TPM (/v1/hosts/{name}/attestation/…) are the same
// calls of the verifier on another subject. Agents' routes carry no
// caller: the TPM proves a registration, and the agent's bearer token the
// rest.

// subject reads the instance or host the request names, as its caller may
// see it.
func (s *Server) subject(r *http.Request) (verifier.Subject, error) {
	c, err := tenantOf(r)
	if err != nil {
		return verifier.Subject{}, err
	}
	if name := r.PathValue("name"); name != "" {
		return s.Verifier.Host(r.Context(), c, name)
	}
	return s.Verifier.Instance(r.Context(), c, r.PathValue("id"))
}

func (s *Server) register(w http.ResponseWriter, r *http.Request) error {
	var req api.RegisterRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	ch, err := s.Verifier.Register(r.Context(), sub, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ch)
	return nil
}

func (s *Server) activate(w http.ResponseWriter, r *http.Request) error {
	var req api.ActivateRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	st, token, err := s.Verifier.Activate(r.Context(), sub, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.Activation{Attestation: statusView(st), AgentToken: token})
	return nil
}

func (s *Server) nonce(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	n, err := s.Verifier.Nonce(r.Context(), sub, bearerToken(r))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, n)
	return nil
}

// evidence reads its body, which may be MiBs (an IMA log), only for the
// registered agent.
func (s *Server) evidence(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	if err := s.Verifier.Authorize(r.Context(), sub, bearerToken(r)); err != nil {
		return err
	}
	var req api.EvidenceRequest
	if err := decodeUpTo(w, r, &req, maxEvidenceBody); err != nil {
		return err
	}
	st, err := s.Verifier.Evidence(r.Context(), sub, bearerToken(r), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, statusView(st))
	return nil
}

func (s *Server) setPolicy(w http.ResponseWriter, r *http.Request) error {
	var req api.PolicyRequest
	if err := decode(w, r, &req); err != nil {
		return err
	}
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	st, err := s.Verifier.SetPolicy(r.Context(), sub, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, statusView(st))
	return nil
}

func (s *Server) getAttestation(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	st, err := s.Verifier.Status(r.Context(), sub)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, statusView(st))
	return nil
}

// token is an instance's attestation status as a signed JWT (ES256) that a
// relying party checks offline against GET /.well-known/vtpmd/jwks.json.
func (s *Server) token(w http.ResponseWriter, r *http.Request) error {
	c, err := tenantOf(r)
	if err != nil {
		return err
	}
	tok, err := s.Verifier.Token(r.Context(), c, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.VerdictToken{Token: tok})
	return nil
}

func (s *Server) jwks(w http.ResponseWriter, r *http.Request) error {
	keys, err := s.Verifier.JWKS()
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	_, err = w.Write(keys)
	return err
}

func (s *Server) history(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	evs, err := s.Verifier.History(r.Context(), sub)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, eventList(evs, false))
	return nil
}

// requestRefresh asks the subject's agent for fresh evidence now, instead
// of at its next interval.
func (s *Server) requestRefresh(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	at, err := s.Verifier.RequestRefresh(r.Context(), sub)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, api.Refresh{Requested: true, RequestedAt: at})
	return nil
}

// awaitRefresh is an agent's long poll: it answers when fresh evidence is
// asked for (with the secrets revoked from the instance since it last
// asked), or after ?wait= (default 60s) with requested false.
func (s *Server) awaitRefresh(w http.ResponseWriter, r *http.Request) error {
	over, end, err := s.longPoll(r, time.Minute)
	if err != nil {
		return err
	}
	defer end()
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	out, err := s.Verifier.AwaitRefresh(r.Context(), sub, bearerToken(r), over)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// forgetHost drops a host's attestation record so that a replaced TPM can
// register.
func (s *Server) forgetHost(w http.ResponseWriter, r *http.Request) error {
	sub, err := s.subject(r)
	if err != nil {
		return err
	}
	if err := s.Verifier.Forget(r.Context(), sub); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// statusView is an attestation status as the API shows it.
func statusView(st verifier.Status) api.Attestation {
	out := api.Attestation{InstanceID: st.InstanceID, HostName: st.HostName, State: string(st.State), RegisteredAt: st.RegisteredAt,
		Verdict: string(st.Verdict), Reasons: st.Reasons, VerifiedAt: st.VerifiedAt, PolicyPCRs: st.PolicyPCRs, Policy: st.Policy,
		PCRs: st.PCRs, IMAEntries: st.IMAEntries, Provisioning: st.Provisioning, Overall: string(st.Overall), Summary: st.Summary}
	if h := st.Host; h != nil {
		out.Host = &api.HostVerdict{Name: h.Name, Verdict: string(h.Verdict), Reasons: h.Reasons, VerifiedAt: h.VerifiedAt}
	}
	return out
}
