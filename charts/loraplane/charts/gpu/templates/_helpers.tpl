{{/*
Names are the umbrella chart's, computed from `global` so that the parent and every subchart agree:
RELEASE-loraplane-<part> (or global.fullnameOverride-<part>). Truncated at 63 characters (DNS labels).
Helpers carry this chart's prefix: named templates are global across the parent and its subcharts.
*/}}
{{- define "loraplane-gpu.name" -}}
{{- (.Values.global).nameOverride | default "loraplane" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane-gpu.fullname" -}}
{{- $name := include "loraplane-gpu.name" . -}}
{{- if (.Values.global).fullnameOverride -}}
{{- .Values.global.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Labels on every object's metadata; selectors use only instance + component (immutable after creation).
Pod templates carry only loraplane-gpu.podLabels (+ component): a label that changes with every chart
release (helm.sh/chart, app.kubernetes.io/version) would roll every pod on an upgrade that changes
nothing else about it.
*/}}
{{- define "loraplane-gpu.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "loraplane-gpu.podLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "loraplane-gpu.podLabels" -}}
app.kubernetes.io/name: {{ include "loraplane-gpu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: loraplane
{{- end -}}

{{/* The shared volume (the parent chart creates it, or the user's existing claim). */}}
{{- define "loraplane-gpu.claimName" -}}
{{- ((.Values.global).storage).existingClaim | default (printf "%s-data" (include "loraplane-gpu.fullname" .)) -}}
{{- end -}}
{{- define "loraplane-gpu.mountPath" -}}
{{- ((.Values.global).storage).mountPath | default "/data" -}}
{{- end -}}

{{/* Pod Security Standard "restricted": what every container of the platform runs with. */}}
{{- define "loraplane-gpu.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Node affinity on GPU nodes (gpuNodeSelectorTerms: any term matches), for the node agents.
*/}}
{{- define "loraplane-gpu.nodeAffinity" -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      {{- toYaml .Values.gpuNodeSelectorTerms | nindent 6 }}
{{- end -}}

{{/*
Whether a node's labels match one of the node selector terms (In, NotIn, Exists, DoesNotExist):
"true" or "". Arguments: labels, terms.
*/}}
{{- define "loraplane-gpu.matchesTerms" -}}
{{- $labels := .labels | default dict }}
{{- $any := false }}
{{- range .terms }}
{{- $all := true }}
{{- range .matchExpressions }}
{{- $has := hasKey $labels .key }}
{{- $value := toString (index $labels .key | default "") }}
{{- if eq .operator "Exists" }}{{ if not $has }}{{ $all = false }}{{ end }}
{{- else if eq .operator "DoesNotExist" }}{{ if $has }}{{ $all = false }}{{ end }}
{{- else if eq .operator "In" }}{{ if not (and $has (has $value (.values | default list))) }}{{ $all = false }}{{ end }}
{{- else if eq .operator "NotIn" }}{{ if and $has (has $value (.values | default list)) }}{{ $all = false }}{{ end }}
{{- else }}{{ $all = false }}
{{- end }}
{{- end }}
{{- if $all }}{{ $any = true }}{{ end }}
{{- end }}
{{- if $any }}true{{ end }}
{{- end -}}

{{/*
The GPU preflight's findings, as YAML: `fail: MESSAGE` (stop the release), `warn: MESSAGE` (the
release notes say it), or nothing. It reads the cluster's nodes with the installer's credentials
(Helm's `lookup`); under `helm template` / client-side dry runs there are none, and no finding.
Arguments: values (the gpu subchart's values), isInstall (.Release.IsInstall).
It blocks only what would certainly fail: a first install with mode `none` where no node advertises
the resource and no node is labelled as a GPU node. With mode `device-plugin` / `operator` this
release installs what advertises the resource, and on an upgrade the GPU nodes may be scaled to zero.
*/}}
{{- define "loraplane-gpu.preflightFindings" -}}
{{- $v := .values }}
{{- if and $v.enabled $v.preflight.enabled }}
{{- $nodes := (lookup "v1" "Node" "" "").items | default list }}
{{- if $nodes }}
{{- $resource := $v.resourceName }}
{{- $advertising := 0 }}
{{- $labelled := 0 }}
{{- range $nodes }}
{{- $count := index (default dict .status.allocatable) $resource | default "0" | toString }}
{{- if ne $count "0" }}{{ $advertising = add1 $advertising }}{{ end }}
{{- if and (eq $resource "nvidia.com/gpu") (include "loraplane-gpu.matchesTerms" (dict "labels" .metadata.labels "terms" $v.gpuNodeSelectorTerms)) }}
{{- $labelled = add1 $labelled }}
{{- end }}
{{- end }}
{{- if eq $advertising 0 }}
{{- $none := printf "none of the cluster's %d nodes advertises %s" (len $nodes) $resource }}
{{- if ne $v.mode "none" }}
warn: {{ printf "GPU preflight: %s yet (%d carry GPU node labels). The %s this release installs registers it on GPU nodes; GPU pods stay Pending until it does. Check: kubectl get nodes -o custom-columns=NAME:.metadata.name,GPUS:.status.allocatable.%s" $none $labelled (eq $v.mode "operator" | ternary "GPU operator" "device plugin") ($resource | replace "." "\\.") | quote }}
{{- else if not .isInstall }}
warn: {{ printf "GPU preflight: %s (GPU nodes scaled to zero?): GPU pods stay Pending until a node offers it. The upgrade goes on." $none | quote }}
{{- else if gt $labelled 0 }}
warn: {{ printf "GPU preflight: %s, though %d carry GPU node labels: nothing advertises the GPUs to the kubelet. Install NVIDIA's device plugin (gpu.mode=device-plugin, nodes with drivers) or GPU operator (gpu.mode=operator, nodes without); GPU pods stay Pending until then." $none $labelled | quote }}
{{- else }}
fail: {{ printf "GPU preflight failed: %s and none is labelled as a GPU node. Add GPU nodes, or let the chart make them schedulable: gpu.mode=device-plugin (drivers on the nodes) or gpu.mode=operator (NVIDIA's GPU operator); for node pools scaled to zero or a cluster without GPUs set gpu.preflight.enabled=false (or gpu.enabled=false)." $none | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
