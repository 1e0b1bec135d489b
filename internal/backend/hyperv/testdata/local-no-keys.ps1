# vtpmd: the vTPM of instance 3f1e0a52-7c1b-4d25-9a5e-0c7d2b9e4a11 on Hyper-V host hv-01.
# Run as Administrator on that host. This plan holds no key material: it fetches
# the keys from vtpmd with the host's credential when it runs.
param([string]$VMName = 'instance-0000002a')
$ErrorActionPreference = 'Stop'
$Server = 'https://vtpmd.example:8780'
$TokenFile = 'C:\ProgramData\vtpmd\host-token'
$KeyRefs = @()

$vm = Get-VM -Name $VMName
if ($vm.Generation -ne 2) { throw "VM $VMName is Generation $($vm.Generation): a vTPM needs Generation 2" }
if ((Get-VMSecurity -VMName $VMName).TpmEnabled) { Write-Output "vTPM already enabled for VM $VMName"; return }

# No key material: a local key protector of the host's own guardian.
Set-VMKeyProtector -VMName $VMName -NewLocalKeyProtector
Enable-VMTPM -VMName $VMName
Write-Output "vTPM enabled for VM $VMName"
