// qscore's Swagger UI: this server's own OpenAPI document, nothing fetched from elsewhere
// (validatorUrl null turns off the badge that would call validator.swagger.io).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
});
