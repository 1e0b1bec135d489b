// Package hyperv makes the PowerShell plan that gives a Hyper-V VM its
// vTPM, after the Nova Hyper-V vTPM design: check the VM is Generation 2,
// build its key protector from the tenant's key material (the owner
// guardian), set it, enable the TPM. A plan names the key material by
// reference only: run on the host, it fetches each secret from vtpmd's key
// manager with the host's own credential, so no key ever rests in a plan,
// a log or an error. No Hyper-V host exists where vtpmd is tested: plans
// are generated and checked, never run here.
package hyperv

import (
	"fmt"
	"strings"
)

// Plan is what one VM's vTPM needs.
type Plan struct {
	InstanceID string
	VMName     string // the Hyper-V VM; Nova names it after the instance
	Host       string // the Hyper-V host the plan is for
	// Server is vtpmd's API, from the host's point of view.
	Server string
	// TokenFile is where the host keeps its credential for vtpmd's key
	// manager (vtpmctl hyperv host-token).
	TokenFile string
	// Keys are the os_vtpm_keys references: the owner guardian's signing
	// certificate, then optionally its encryption certificate (each a
	// base64 PFX), or none for a local key protector of the host's own.
	Keys []string
	// HGS, when set, is the Host Guardian Service's URL: the key protector
	// then also names the HGS guardian, and the host must be guarded.
	HGS string
}

// DefaultTokenFile is where a Hyper-V host keeps its vtpmd credential,
// readable by Administrators and SYSTEM only.
const DefaultTokenFile = `C:\ProgramData\vtpmd\host-token`

// Script is the plan as a PowerShell script. Every value is a
// single-quoted PowerShell literal; none is key material.
func (p Plan) Script() string {
	var b strings.Builder
	line := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	tokenFile := p.TokenFile
	if tokenFile == "" {
		tokenFile = DefaultTokenFile
	}
	line("# vtpmd: the vTPM of instance %s on Hyper-V host %s.", p.InstanceID, p.Host)
	line("# Run as Administrator on that host. This plan holds no key material: it fetches")
	line("# the keys from vtpmd with the host's credential when it runs.")
	line("param([string]$VMName = %s)", quote(p.VMName))
	line("$ErrorActionPreference = 'Stop'")
	line("$Server = %s", quote(p.Server))
	line("$TokenFile = %s", quote(tokenFile))
	line("$KeyRefs = @(%s)", quoteList(p.Keys))
	line("")
	line("$vm = Get-VM -Name $VMName")
	line("if ($vm.Generation -ne 2) { throw \"VM $VMName is Generation $($vm.Generation): a vTPM needs Generation 2\" }")
	line("if ((Get-VMSecurity -VMName $VMName).TpmEnabled) { Write-Output \"vTPM already enabled for VM $VMName\"; return }")
	if p.HGS != "" {
		line("if (-not (Get-HgsClientConfiguration).IsHostGuarded) { throw 'This host is not guarded by the Host Guardian Service' }")
	}
	if len(p.Keys) == 0 {
		line("")
		line("# No key material: a local key protector of the host's own guardian.")
		line("Set-VMKeyProtector -VMName $VMName -NewLocalKeyProtector")
	} else {
		line("")
		line("# The owner guardian, from the tenant's certificates, fetched with the host's credential.")
		line("$token = (Get-Content -Raw -LiteralPath $TokenFile).Trim()")
		line("$work = New-Item -ItemType Directory -Path (Join-Path $env:TEMP ('vtpmd-' + [guid]::NewGuid()))")
		line("try {")
		line("  $pfx = @(foreach ($ref in $KeyRefs) {")
		line("    $secret = Invoke-RestMethod -Method Get -Uri \"$Server/v1/secrets/$ref/payload\" -Headers @{ Authorization = \"Bearer $token\" }")
		line("    $file = Join-Path $work \"$ref.pfx\"")
		line("    [IO.File]::WriteAllBytes($file, [Convert]::FromBase64String($secret.payload))")
		line("    $file")
		line("  })")
		line("  $encryption = if ($pfx.Count -gt 1) { $pfx[1] } else { $pfx[0] }")
		line("  $owner = New-HgsGuardian -Name ('vtpmd-' + $VMName) -SigningCertificate $pfx[0] -EncryptionCertificate $encryption -AllowUntrustedRoot")
		line("} finally {")
		line("  Remove-Item -Recurse -Force -LiteralPath $work")
		line("}")
		if p.HGS != "" {
			line("$metadata = Join-Path $env:TEMP ('vtpmd-hgs-' + [guid]::NewGuid() + '.xml')")
			line("Invoke-WebRequest -UseBasicParsing -Uri %s -OutFile $metadata", quote(strings.TrimRight(p.HGS, "/")+"/KeyProtection/service/metadata/2014-07/metadata.xml"))
			line("$hgs = Import-HgsGuardian -Path $metadata -Name ('vtpmd-hgs-' + $VMName) -AllowUntrustedRoot")
			line("Remove-Item -Force -LiteralPath $metadata")
			line("$kp = New-HgsKeyProtector -Owner $owner -Guardian $hgs -AllowUntrustedRoot")
		} else {
			line("$kp = New-HgsKeyProtector -Owner $owner -AllowUntrustedRoot")
		}
		line("Set-VMKeyProtector -VMName $VMName -KeyProtector $kp.RawData")
	}
	line("Enable-VMTPM -VMName $VMName")
	line("Write-Output \"vTPM enabled for VM $VMName\"")
	return b.String()
}

// quote is s as a PowerShell single-quoted literal, in which only the
// single quote needs escaping (by doubling; PowerShell also takes the
// typographic quotes as quotes, so they are doubled too).
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('\'')
	for _, r := range s {
		if r == '\'' || r == '‘' || r == '’' || r == '‚' || r == '‛' {
			b.WriteRune(r)
		}
		b.WriteRune(r)
	}
	b.WriteByte('\'')
	return b.String()
}

func quoteList(items []string) string {
	q := make([]string, len(items))
	for i, s := range items {
		q[i] = quote(s)
	}
	return strings.Join(q, ", ")
}
