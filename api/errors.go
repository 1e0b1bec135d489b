package api

// ErrorBody is every error response: {"error": {"code": ..., "message": ...}}.
type ErrorBody struct {
	Error Error `json:"error"`
}

// Error is a refusal or failure with a stable code and a message for people.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
}

// Code is a stable, machine-readable reason for an error response. Codes
// appear in responses and in vtpmctl's output and never change meaning: a
// client matches on the code, never on the message. This file lists every
// code the API answers with, each with its HTTP status.
type Code string

// Codes of any route: the request itself, who sends it, the server.
const (
	// CodeInvalidJSON (400): the body is not one JSON value of the
	// route's request type (an unknown field, a second value), or the
	// route takes no body and one came.
	CodeInvalidJSON Code = "invalid_json"
	// CodeBodyTooLarge (413): the body is larger than the route takes.
	CodeBodyTooLarge Code = "body_too_large"
	// CodeInvalidParameter (400): a query parameter or a field breaks its
	// rule; the message names it.
	CodeInvalidParameter Code = "invalid_parameter"
	// CodeInvalidInstanceID (400): an instance id that is not a canonical
	// UUID.
	CodeInvalidInstanceID Code = "invalid_instance_id"
	// CodeInvalidProject (400 or 403): a project id that is malformed or
	// missing (400), or another project than the one the caller is scoped
	// to (403).
	CodeInvalidProject Code = "invalid_project"
	// CodeNotFound (404): no such route, vTPM, host, secret or policy, or
	// one of another project's, which reads as absent.
	CodeNotFound Code = "not_found"
	// CodeMethodNotAllowed (405): the path does not take the method; Allow
	// lists those it takes.
	CodeMethodNotAllowed Code = "method_not_allowed"
	// CodeUnauthenticated (401): the caller proved nobody: no client
	// certificate, Keystone token or operator's socket on a tenant's or
	// the operator's route, a Keystone token that is malformed, expired
	// or revoked, no or a wrong agent token or host credential on an
	// agent's, no client certificate on a host's (/v1/agent/...).
	CodeUnauthenticated Code = "unauthenticated"
	// CodeForbidden (403): the caller is known but may not do this: a
	// project on an operator's route, a Keystone role that does not allow
	// it (a reader changing anything), a host asking for a key no
	// instance on it names, a host certificate on a tenant's or the
	// operator's route, or another certificate on a host's.
	CodeForbidden Code = "forbidden"
	// CodeIdentityUnavailable (503, with Retry-After): with Keystone
	// authentication, Keystone could not validate the caller's token
	// (unreachable, failing, or refusing vtpmd's own service
	// credentials); the request was not carried out, and may be repeated
	// as it is.
	CodeIdentityUnavailable Code = "identity_unavailable"
	// CodeStorageFull (507): the server's disk is full; nothing was
	// changed.
	CodeStorageFull Code = "storage_full"
	// CodeStoreUnavailable (503, with Retry-After): the server cannot
	// reach its database (PostgreSQL down, failing over, or out of
	// connections); the request was not carried out, and may be repeated
	// as it is. Any route that reads or writes the store answers so.
	CodeStoreUnavailable Code = "store_unavailable"
	// CodeKeyManagerUnavailable (503, with Retry-After): the key manager
	// (Barbican) did not answer, or answered that it cannot serve now,
	// after the server's retries; nothing was carried out (no vTPM was
	// recorded without its secret), and the request may be repeated.
	CodeKeyManagerUnavailable Code = "key_manager_unavailable"
	// CodeSecretNeedsOwner (403): the vTPM's secret security is user or
	// host and its secret is kept in its owner's project in the key
	// manager (Barbican): only a request with a token of that project can
	// create, start or delete-and-shred it, as with Nova. In a vTPM's
	// reason: its host cannot start it until its owner starts it.
	CodeSecretNeedsOwner Code = "secret_needs_owner"
	// CodeInternal (500): a fault of the server, which logs it; the
	// message says nothing more.
	CodeInternal Code = "internal"
)

// Codes of vTPMs: creating, changing and reading them.
const (
	// CodeNoVTPMRequested (400): the flavor and image ask for no vTPM.
	CodeNoVTPMRequested Code = "no_vtpm_requested"
	// CodeAlreadyExists (409): the instance has a vTPM, or a policy of the
	// name exists.
	CodeAlreadyExists Code = "already_exists"
	// CodeConflict (409): the vTPM's state does not allow the change (it
	// is being deleted, or attached to another domain), or it changed
	// while the request ran.
	CodeConflict Code = "conflict"
	// CodeNotReady (409): the vTPM has not been manufactured yet (no EK).
	CodeNotReady Code = "not_ready"
	// CodeNotSupported (409): this deployment or host cannot do it: no
	// libvirt domains to attach to, no verdict signing.
	CodeNotSupported Code = "not_supported"
	// CodeHostTPMRequired (403): the host's own TPM is registered, so its
	// agent enrols only with the agent token that TPM earned.
	CodeHostTPMRequired Code = "host_tpm_required"
	// CodeHostUnavailable (503): the host's agent did not answer in time
	// (a drift check); retry once it is up.
	CodeHostUnavailable Code = "host_unavailable"
)

// Codes of resizing a vTPM (POST /v1/vtpms/{id}/resize, .../confirm,
// .../revert).
const (
	// CodeSecretSecurityChangeNotSupported (400): the resize changes the
	// secret security to or from deployment (Nova's refusal).
	CodeSecretSecurityChangeNotSupported Code = "secret_security_change_not_supported"
	// CodeResizeNotSupported (400): the vTPM or the new flavor is
	// Hyper-V's, which vtpmd does not resize.
	CodeResizeNotSupported Code = "resize_not_supported"
	// CodeResizePending (409): a resize of the vTPM awaits confirm or
	// revert; a second one waits for that.
	CodeResizePending Code = "resize_pending"
	// CodeNoResizePending (409): confirm or revert of a vTPM with no
	// resize pending.
	CodeNoResizePending Code = "no_resize_pending"
	// CodeResizeInProgress (409): the host's agent has not finished the
	// resize's last step (setting the old TPM aside, or a confirm or
	// revert); retry once it has.
	CodeResizeInProgress Code = "resize_in_progress"
	// CodeInvalidPhase (409): the vTPM's phase does not allow the request:
	// a resize needs it active or stopped.
	CodeInvalidPhase Code = "invalid_phase"
	// CodeResizeNeedsMigration (409): the vTPM's host lacks a trait the
	// resized vTPM needs, so the resize would have to move the instance:
	// cold migration's work, not built yet.
	CodeResizeNeedsMigration Code = "resize_needs_migration"
)

// Codes of request semantics (internal/spec): the flavor and image's
// refusals, the same from POST /v1/resolve, POST /v1/vtpms and vtpmctl
// resolve. All are 400 but CodeNoValidHost, 409.
const (
	// CodeFlavorImageConflict: flavor and image set the same setting to different values.
	CodeFlavorImageConflict Code = "flavor_image_conflict"
	// CodeInvalidTPMVersion: a version other than exactly "1.2" or "2.0".
	CodeInvalidTPMVersion Code = "invalid_tpm_version"
	// CodeInvalidTPMModel: a model other than tpm-tis or tpm-crb.
	CodeInvalidTPMModel Code = "invalid_tpm_model"
	// CodeInvalidHypervisorType: an image hypervisor_type that Nova does not
	// know, the empty string included.
	CodeInvalidHypervisorType Code = "invalid_hypervisor_type"
	// CodeCRBRequiresTPM2: tpm-crb with a TPM 1.2.
	CodeCRBRequiresTPM2 Code = "crb_requires_tpm2"
	// CodeInvalidSecretSecurity: hw:tpm_secret_security other than user, host or deployment.
	CodeInvalidSecretSecurity Code = "invalid_secret_security"
	// CodePropertyNotSupported: a property of the other hypervisor's surface.
	CodePropertyNotSupported Code = "property_not_supported"
	// CodeInvalidVTPMPolicy: os_vtpm or os:vtpm other than disabled, optional or required.
	CodeInvalidVTPMPolicy Code = "invalid_vtpm_policy"
	// CodeVTPMPolicyConflict: image and flavor policies that cannot both hold.
	CodeVTPMPolicyConflict Code = "vtpm_policy_conflict"
	// CodeGen2Required: a Hyper-V vTPM on an image that is not Generation 2.
	CodeGen2Required Code = "gen2_required"
	// CodeTooManyVTPMKeys: more entries in os_vtpm_keys than a request may name.
	CodeTooManyVTPMKeys Code = "too_many_vtpm_keys"
	// CodeInvalidVTPMKey: an os_vtpm_keys entry that is empty, repeated or not a canonical UUID.
	CodeInvalidVTPMKey Code = "invalid_vtpm_key"
	// CodeVTPMKeysWithoutVTPM: os_vtpm_keys on a request that gets no vTPM.
	CodeVTPMKeysWithoutVTPM Code = "vtpm_keys_without_vtpm"
	// CodeNoValidHost (409): no host that is up (neither down nor
	// draining) offers every required trait with free capacity; the
	// message says what stood in the way.
	CodeNoValidHost Code = "no_valid_host"
)

// Codes of attestation: registration, evidence, policies.
const (
	// CodeInvalidAK (400): the attestation key is not one vtpmd takes.
	CodeInvalidAK Code = "invalid_ak"
	// CodeEKMismatch (403): the EK is not the one vtpmd made for the
	// instance, or not the one its host registered with (or its
	// certificate certifies).
	CodeEKMismatch Code = "ek_mismatch"
	// CodeEKUntrusted (403): a host's EK certificate does not chain to a
	// configured host EK CA.
	CodeEKUntrusted Code = "ek_untrusted"
	// CodeActivationFailed (403): the credential does not match its
	// ticket, or the ticket is another subject's.
	CodeActivationFailed Code = "activation_failed"
	// CodeNotRegistered (404 or 409): reading the attestation of an
	// instance or host that never registered (404); an act that needs a
	// registered attestation key, or an activation of a registration
	// that expired or was overtaken (409).
	CodeNotRegistered Code = "not_registered"
	// CodeStaleNonce (409): evidence that does not answer the current
	// nonce (used, expired or never issued).
	CodeStaleNonce Code = "stale_nonce"
	// CodeNoEvidence (409): no evidence was accepted yet to learn a
	// policy from.
	CodeNoEvidence Code = "no_evidence"
	// CodeNoEventLog (400): evidence without a firmware event log to
	// replay the quote against; the nonce is still good.
	CodeNoEventLog Code = "no_event_log"
	// CodeFullIMALogRequired (409) refuses evidence whose IMA log
	// continues from an entry the verifier does not hold (it lost its
	// copy, or the agent's count is not its own): send the whole log
	// again, with the same quote and nonce, which the refusal left good.
	CodeFullIMALogRequired Code = "full_ima_log_required"
)

// Codes of secrets and Hyper-V vTPMs.
const (
	// CodeInvalidPayload (400): a secret's payload is empty or too large.
	CodeInvalidPayload Code = "invalid_payload"
	// CodeVTPMKeyMissing (409): an os_vtpm_keys secret is not a secret of
	// the instance's project in the key manager.
	CodeVTPMKeyMissing Code = "vtpm_key_missing"
	// CodeTooManyHyperVKeys (409): os_vtpm_keys names more secrets than a
	// Hyper-V vTPM uses.
	CodeTooManyHyperVKeys Code = "too_many_hyperv_keys"
	// CodeNotHyperV (409): a Hyper-V plan for a vTPM that is not one.
	CodeNotHyperV Code = "not_hyperv"
)

// Codes of adopting a vTPM that Nova made (POST /v1/vtpms/{id}/adopt).
// Each refusal leaves no record behind.
const (
	// CodeDomainNotFound (404): no host asked (the one named, or every
	// libvirt host that is up) has a libvirt domain of that name.
	CodeDomainNotFound Code = "domain_not_found"
	// CodeNoVTPM (409): the domain has no vTPM vtpmd can take over: no
	// TPM device, or one that is not libvirt's encrypted emulator (what
	// Nova makes), or its UUID is not the instance id.
	CodeNoVTPM Code = "no_vtpm"
	// CodeVTPMStateNotFound (409): the domain's vTPM has no state on its
	// host yet (libvirt makes it at the guest's first start).
	CodeVTPMStateNotFound Code = "vtpm_state_not_found"
	// CodeAlreadyManaged (409): vtpmd manages a vTPM of that instance, or
	// one keyed by that secret, already.
	CodeAlreadyManaged Code = "already_managed"
	// CodeSecretNotFound (404): the key manager has no secret of that
	// UUID.
	CodeSecretNotFound Code = "secret_not_found"
	// CodeWrongSecret (409): the vTPM's state does not open with the
	// secret's passphrase.
	CodeWrongSecret Code = "wrong_secret"
	// CodeAdoptionFailed (503): the host's agent could not look at the
	// domain or its state; the message says why.
	CodeAdoptionFailed Code = "adoption_failed"
)

// Codes of state bundles and backups (/v1/vtpms/{id}/backups, and the
// agents' transfers). A refused import leaves the host's state as it was.
const (
	// CodeBundleCorrupt (409): the state bundle does not parse, is
	// truncated, or fails its seal (a byte changed, or not sealed with the
	// vTPM's secret).
	CodeBundleCorrupt Code = "bundle_corrupt"
	// CodeBundleMismatch (409): the state bundle is another vTPM's.
	CodeBundleMismatch Code = "bundle_mismatch"
	// CodeStaleBundle (409): the bundle's generation is older than the
	// newest the server recorded of the vTPM; the operator may restore it
	// with allow_rollback.
	CodeStaleBundle Code = "stale_bundle"
	// CodeVTPMNotStopped (409): the vTPM must be stopped (desired and
	// observed) for its state to be replaced.
	CodeVTPMNotStopped Code = "vtpm_not_stopped"
	// CodeNotManufactured (409): the vTPM has no TPM yet, so no state to
	// back up.
	CodeNotManufactured Code = "not_manufactured"
	// CodeBackupNotFound (404): the vTPM has no backup (of that
	// generation).
	CodeBackupNotFound Code = "backup_not_found"
	// CodeTransferFailed (503): the host's agent could not export or
	// import the state; the message says why.
	CodeTransferFailed Code = "transfer_failed"
	// CodeMigrationInProgress (409): the vTPM is being migrated (to
	// another host than the one asked, for a migrate; at all, for a live
	// migration, a start, delete or restore); running the same migrate
	// again finishes a cold move.
	CodeMigrationInProgress Code = "migration_in_progress"
	// CodeGuestNotRunning (409): a live migration asked of a vTPM whose
	// guest is not running (or that has no guest): migrate it cold.
	CodeGuestNotRunning Code = "guest_not_running"
	// CodeGuestRunsHere (409; agent protocol): a live migration's target
	// was asked to undo what it prepared, but the guest runs there: the
	// migration landed.
	CodeGuestRunsHere Code = "guest_runs_here"
	// CodeGuestArriving (409; agent protocol): a live migration's target
	// was asked to undo what it prepared while the guest is still
	// arriving: ask again once libvirt has finished or failed.
	CodeGuestArriving Code = "guest_arriving"
	// CodeTargetIsSource (400): the host a migration names is the one the
	// vTPM is on.
	CodeTargetIsSource Code = "target_is_source"
	// CodeVTPMShelved (409): the vTPM is shelved, or being shelved or
	// unshelved: shelve it again, or start it, only once it is unshelved.
	CodeVTPMShelved Code = "vtpm_shelved"
	// CodeVTPMNotShelved (409): unshelve asked of a vTPM that is not
	// shelved.
	CodeVTPMNotShelved Code = "vtpm_not_shelved"
	// CodeHostNotDown (409): evacuate asked of a host whose agent still
	// sends heartbeats; the operator may say it is gone with force.
	CodeHostNotDown Code = "host_not_down"
)

// Codes of the key broker (/v1/broker/secrets, and an agent's release
// POST /v1/vtpms/{id}/secrets/{secret}/release). A secret of another
// project reads as absent (not_found); an instance that never registered
// is not_registered (409).
const (
	// CodeReleaseNotAllowed (403): the secret is not for this instance:
	// it is not among those it is released to, or the instance is not
	// judged by the policy the secret names.
	CodeReleaseNotAllowed Code = "release_not_allowed"
	// CodeNotTrusted (403): the instance's overall verdict (its own, its
	// vTPM's provenance, its host's) is not trusted; the message says why.
	CodeNotTrusted Code = "not_trusted"
	// CodeEvidenceTooOld (409): the instance's or its host's last genuine
	// evidence is older than the secret allows; the agent attests again
	// and retries.
	CodeEvidenceTooOld Code = "evidence_too_old"
	// CodeInstanceDeleted (409): the instance's vTPM is being deleted.
	CodeInstanceDeleted Code = "instance_deleted"
)

// Codes of hosts' enrolment and their agents' calls (/v1/agent/...).
const (
	// CodeInvalidHostName (400): a host name is not a letter or digit
	// followed by up to 62 letters, digits, '_', '.' and '-'.
	CodeInvalidHostName Code = "invalid_host_name"
	// CodeInvalidJoinToken (401): the join token is unknown, already used
	// or expired (one answer for all three).
	CodeInvalidJoinToken Code = "invalid_join_token"
	// CodeInvalidCSR (400): the certificate request does not parse, its
	// signature does not verify, or its key is not ECDSA P-256/P-384 or
	// RSA of at least 2048 bits. The join token stays usable.
	CodeInvalidCSR Code = "invalid_csr"
	// CodeInvalidHostCertificate (401): the host certificate, issued by
	// the host CA, is revoked or unknown; the host must enrol again.
	CodeInvalidHostCertificate Code = "invalid_host_certificate"
)

// Codes of the Xen UUID service (vtpmd xen-uuid-server, GET /), which
// answers with the same error body; besides these it uses CodeNotFound,
// CodeMethodNotAllowed and CodeInternal.
const (
	// CodeGroupFull (507): the VTPM manager's group takes no more vTPMs.
	CodeGroupFull Code = "group_full"
)
