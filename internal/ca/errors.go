package ca

import "errors"

var (
	// ErrDamaged: a stored CA cannot be loaded: it is not a CA
	// certificate and its PKCS#8 key, PEM, or the key is not the
	// certificate's. The caller reports this rather than making a new CA,
	// because every certificate already issued chains to the old one.
	ErrDamaged = errors.New("deployment ca is damaged")

	// ErrUnsupportedKey: IssueEK was given a public key that is not an EK
	// key type: RSA (2048, 3072 or 4096 bits) or ECDSA (P-256 or P-384),
	// and only RSA-2048 for a TPM 1.2.
	ErrUnsupportedKey = errors.New("unsupported ek public key")

	// ErrInvalidProfile: an EKProfile field is missing, too long, not
	// UTF-8, or out of range (unknown TPM version, NotAfter before now or
	// after the CA's own expiry).
	ErrInvalidProfile = errors.New("invalid ek profile")

	// ErrNotEK: a certificate does not parse, or lacks what makes it a TCG
	// EK certificate (the subjectAltName directoryName with TPM
	// manufacturer, model and version; for VerifyEK also the
	// tcg-kp-EKCertificate extended key usage).
	ErrNotEK = errors.New("not a tcg ek certificate")

	// ErrInvalidCSR: IssueHost was given a certificate request that does
	// not parse, whose signature does not verify, or whose key is not
	// ECDSA P-256/P-384 or RSA of at least 2048 bits.
	ErrInvalidCSR = errors.New("invalid host certificate request")
)
