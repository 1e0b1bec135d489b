# vtpmd: the vTPM of instance 3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11 on Hyper-V host hv-01.
# Run as Administrator on that host. This plan holds no key material: it fetches
# the keys from vtpmd with the host's credential when it runs.
param([string]$VMName = 'instance-0000002a')
$ErrorActionPreference = 'Stop'
$Server = 'https://vtpmd.example:8780'
$TokenFile = 'C:\ProgramData\vtpmd\host-token'
$KeyRefs = @('6a0e5c7e-1111-4a4a-9b9b-000000000001', '6a0e5c7e-1111-4a4a-9b9b-000000000002')

$vm = Get-VM -Name $VMName
if ($vm.Generation -ne 2) { throw "VM $VMName is Generation $($vm.Generation): a vTPM needs Generation 2" }
if ((Get-VMSecurity -VMName $VMName).TpmEnabled) { Write-Output "vTPM already enabled for VM $VMName"; return }

# The owner guardian, from the tenant's certificates, fetched with the host's credential.
$token = (Get-Content -Raw -LiteralPath $TokenFile).Trim()
$work = New-Item -ItemType Directory -Path (Join-Path $env:TEMP ('vtpmd-' + [guid]::NewGuid()))
try {
  $pfx = @(foreach ($ref in $KeyRefs) {
    $secret = Invoke-RestMethod -Method Get -Uri "$Server/v1/secrets/$ref/payload" -Headers @{ Authorization = "Bearer $token" }
    $file = Join-Path $work "$ref.pfx"
    [IO.File]::WriteAllBytes($file, [Convert]::FromBase64String($secret.payload))
    $file
  })
  $encryption = if ($pfx.Count -gt 1) { $pfx[1] } else { $pfx[0] }
  $owner = New-HgsGuardian -Name ('vtpmd-' + $VMName) -SigningCertificate $pfx[0] -EncryptionCertificate $encryption -AllowUntrustedRoot
} finally {
  Remove-Item -Recurse -Force -LiteralPath $work
}
$kp = New-HgsKeyProtector -Owner $owner -AllowUntrustedRoot
Set-VMKeyProtector -VMName $VMName -KeyProtector $kp.RawData
Enable-VMTPM -VMName $VMName
Write-Output "vTPM enabled for VM $VMName"
