{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "loraplane.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "loraplane.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "loraplane.claimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-data" (include "loraplane.fullname" .)) -}}
{{- end -}}

{{/* Pod Security Standard "restricted": what every container of the platform runs with. */}}
{{- define "loraplane.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The Secret and key holding vLLM's --api-key: the user's, or the one the chart generates. */}}
{{- define "loraplane.vllmKeySecret" -}}
{{- .Values.serving.apiKeySecret.name | default (printf "%s-vllm-key" (include "loraplane.fullname" .)) -}}
{{- end -}}
{{- define "loraplane.vllmKeyKey" -}}
{{- if .Values.serving.apiKeySecret.name }}{{ .Values.serving.apiKeySecret.key }}{{ else }}api-key{{ end -}}
{{- end -}}

{{/* The Secret holding the gateway's client keys (one per line). */}}
{{- define "loraplane.gatewayKeysSecret" -}}
{{- .Values.gateway.apiKeysSecret.name | default (printf "%s-gateway-keys" (include "loraplane.fullname" .)) -}}
{{- end -}}

{{/* A random secret value that stays the same across upgrades (read back from the live Secret). */}}
{{- define "loraplane.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .namespace .name -}}
{{- if and $existing $existing.data (index $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}
