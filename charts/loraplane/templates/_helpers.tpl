{{/* Parent-only helpers; names, labels, the claim and the security context are in _names.tpl. */}}

{{/* The gateway's own slim image (gateway.image). */}}
{{- define "loraplane.gatewayImage" -}}
{{- $i := .Values.gateway.image -}}
{{- printf "%s:%s" $i.repository ($i.tag | default .Chart.AppVersion) -}}
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

{{/*
A key the chart generates, as the Secret's base64 data: the value of the live Secret (lookup), so it
stays the same across upgrades, else a new random one. Computed once per render and kept in .Release
(the one map the parent and every subchart share while rendering): the Secret and the
checksum/<part> annotations of the pods that use it (loraplane.keyChecksums) then see the same value,
even on a first install or under `helm template`, where lookup finds nothing. The vLLM Deployment
(serving subchart) calls it too: the key is the parent's.
Arguments: dict "root" $ "name" SECRET "key" DATA-KEY.
*/}}
{{- define "loraplane.generatedKey" -}}
{{- $root := .root -}}
{{- if not (hasKey $root.Release "loraplaneGeneratedKeys") -}}
{{- $_ := set $root.Release "loraplaneGeneratedKeys" dict -}}
{{- end -}}
{{- $memo := get $root.Release "loraplaneGeneratedKeys" -}}
{{- $id := printf "%s/%s/%s" $root.Release.Namespace .name .key -}}
{{- if not (hasKey $memo $id) -}}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace .name -}}
{{- $kept := (($existing | default dict).data | default dict) | dig .key "" -}}
{{- $_ := set $memo $id ($kept | default (randAlphaNum 40 | b64enc)) -}}
{{- end -}}
{{- get $memo $id -}}
{{- end -}}

{{/* The generated Secrets (none for a Secret the user names): part => dict name, key. The Secrets
(secrets.yaml) and the gateway's checksum annotations are made from this one list. */}}
{{- define "loraplane.generatedSecrets" -}}
{{- $fullname := include "loraplane.fullname" . -}}
{{- $out := dict -}}
{{- if and .Values.serving.enabled (not .Values.serving.apiKeySecret.name) -}}
{{- $_ := set $out "vllm-key" (dict "name" (printf "%s-vllm-key" $fullname) "key" "api-key" "component" "vllm") -}}
{{- end -}}
{{- if and .Values.gateway.enabled .Values.serving.enabled (not .Values.gateway.apiKeysSecret.name) -}}
{{- $_ := set $out "gateway-keys" (dict "name" (printf "%s-gateway-keys" $fullname) "key" .Values.gateway.apiKeysSecret.key "component" "gateway") -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The pod annotations that roll the pods using generated keys when one changes: checksum/<part> =
sha256 of the Secret's data (a 40-character random key: its hash gives nothing away), for the
generated keys among the parts listed; a Secret the user names gets none (the chart cannot read it).
Arguments: dict "root" $ "parts" (list "vllm-key" ...). Returns a YAML map ({} when none).
*/}}
{{- define "loraplane.keyChecksums" -}}
{{- $root := .root -}}
{{- $generated := include "loraplane.generatedSecrets" $root | fromYaml -}}
{{- $out := dict -}}
{{- range $part := .parts -}}
{{- with get $generated $part -}}
{{- $_ := set $out (printf "checksum/%s" $part) (include "loraplane.generatedKey" (dict "root" $root "name" .name "key" .key) | sha256sum) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
