{{/*
Names are the umbrella chart's, computed from `global` so that the parent and every subchart agree:
RELEASE-loraplane-<part> (or global.fullnameOverride-<part>). Truncated at 63 characters (DNS labels).
Helpers carry this chart's prefix: named templates are global across the parent and its subcharts.
*/}}
{{- define "loraplane-trainer.name" -}}
{{- (.Values.global).nameOverride | default "loraplane" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane-trainer.fullname" -}}
{{- $name := include "loraplane-trainer.name" . -}}
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
Pod templates carry only loraplane-trainer.podLabels (+ component): a label that changes with every chart
release (helm.sh/chart, app.kubernetes.io/version) would roll every pod on an upgrade that changes
nothing else about it.
*/}}
{{- define "loraplane-trainer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "loraplane-trainer.podLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "loraplane-trainer.podLabels" -}}
app.kubernetes.io/name: {{ include "loraplane-trainer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: loraplane
{{- end -}}

{{/* The shared volume (the parent chart creates it, or the user's existing claim). */}}
{{- define "loraplane-trainer.claimName" -}}
{{- ((.Values.global).storage).existingClaim | default (printf "%s-data" (include "loraplane-trainer.fullname" .)) -}}
{{- end -}}
{{- define "loraplane-trainer.mountPath" -}}
{{- ((.Values.global).storage).mountPath | default "/data" -}}
{{- end -}}

{{/*
The pod's affinity: trainer.affinity, plus with global.storage.singleNode a required pod affinity on
the node's hostname to the release's pods that mount the shared volume (vLLM, trainer, the
model-fetch Job, `evals submit`'s eval pods and the CLI's `volume put` pod): a ReadWriteOnce volume
attaches to one node only. The first such pod lands anywhere (a pod matching its own term is
schedulable while no other matches), the others follow it. The same term in the trainer's and
serving's helpers (the eval pods use serving's volumeAffinity): change both.
*/}}
{{- define "loraplane-trainer.affinity" -}}
{{- $affinity := deepCopy (.Values.affinity | default dict) -}}
{{- if ((.Values.global).storage).singleNode -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (dict "app.kubernetes.io/instance" .Release.Name) "matchExpressions" (list (dict "key" "app.kubernetes.io/component" "operator" "In" "values" (list "vllm" "trainer" "volume-put" "model-fetch" "eval")))) -}}
{{- $pod := $affinity.podAffinity | default dict -}}
{{- $_ := set $pod "requiredDuringSchedulingIgnoredDuringExecution" (append ($pod.requiredDuringSchedulingIgnoredDuringExecution | default list) $term) -}}
{{- $_ := set $affinity "podAffinity" $pod -}}
{{- end -}}
{{- with $affinity }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* Pod Security Standard "restricted": what every container of the platform runs with. */}}
{{- define "loraplane-trainer.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
