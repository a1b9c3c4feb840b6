{{/* Names and labels of every object: templates take them from here only. */}}

{{- define "vmfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vmfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component (no chart version: selectors are immutable). */}}
{{- define "vmfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmfleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects. Call with (dict "root" $ "component" "controller"). */}}
{{- define "vmfleet.labels" -}}
{{ include "vmfleet.selectorLabels" . }}
helm.sh/chart: {{ include "vmfleet.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: vmfleet
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "vmfleet.componentName" -}}
{{- printf "%s-%s" (include "vmfleet.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmfleet.controllerServiceAccount" -}}
{{- default (include "vmfleet.componentName" (dict "root" . "component" "controller")) .Values.controller.serviceAccount.name -}}
{{- end -}}


{{- define "vmfleet.transferServiceAccount" -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "transfer-worker") -}}
{{- end -}}

{{/* The namespaces the controller handles (watchNamespaces, default the release namespace). */}}
{{- define "vmfleet.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson (uniq .Values.watchNamespaces) -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "vmfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "vmfleet.brokerServiceName" -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "broker") -}}
{{- end -}}

{{/* The broker URL env var: a fixed URL to the bundled Redis, or from the external Secret. */}}
{{- define "vmfleet.brokerEnv" -}}
{{- if .Values.broker.bundled.enabled }}
- name: VMFLEET_BROKER_URL
  value: {{ printf "redis://%s.%s.svc:6379/0" (include "vmfleet.brokerServiceName" .) .Release.Namespace | quote }}
{{- else }}
- name: VMFLEET_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "broker.external.existingSecret is required when broker.bundled.enabled is false" .Values.broker.external.existingSecret }}
      key: {{ .Values.broker.external.secretKey }}
{{- end }}
{{- end -}}

{{/* Labels the controller puts on the per-VM worker pods (vmfleet/api/constants.py). */}}
{{- define "vmfleet.workerPodSelector" -}}
app.kubernetes.io/name: vmfleet
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: vmfleet
{{- end -}}

{{/* Label of the Services the ServiceMonitor scrapes. */}}
{{- define "vmfleet.metricsServiceLabel" -}}
vmfleet.io/metrics: "true"
{{- end -}}

{{/* What the controller may do with vmfleet objects, Events and ConfigMaps, and see of
Deployments: every verb here is one the code uses (controller/, kopf's watches), or one a
feature of this release line needs (`create` RemoteCommands: schedules; `get` ConfigMaps:
command templates). With rbac.clusterWide these are cluster-wide. */}}
{{- define "vmfleet.controllerRules" -}}
# get: a RemoteVM the watch has not brought yet; patch: pause on a host-key mismatch, drop
# the finalizer of older versions.
- apiGroups: [vmfleet.io]
  resources: [remotevms]
  verbs: [get, list, watch, patch]
# delete: ttlSecondsAfterFinished; create: schedules.
- apiGroups: [vmfleet.io]
  resources: [remotecommands]
  verbs: [get, list, watch, patch, delete, create]
- apiGroups: [vmfleet.io]
  resources: [remotevms/status, remotecommands/status]
  verbs: [patch]
# The worker Deployments' watch (its cache: the controller never reads one by name).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch]
# Events of vmfleet objects (the controller's and kopf's): created, never changed.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
{{- end -}}

{{/* Worker Deployments, applied server-side (create + patch; never update or delete: the
RemoteVMs own them and the garbage collector removes them). Always in a Role of each
watched namespace, never cluster-wide, and fenced further by the chart's
ValidatingAdmissionPolicy. */}}
{{- define "vmfleet.controllerWorkerRules" -}}
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, patch]
{{- end -}}
